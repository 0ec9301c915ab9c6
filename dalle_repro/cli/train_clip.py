"""Train a small CLIP on image shards, for reranking without downloads (the demo's reranker).

Usage: python tools/train_clip.py [--config FILE] [key.sub=value ...]

Example:
  python tools/train_clip.py 'data.shards=data/emoji/train/*.tar' 'data.val_shards=data/emoji/val/*.tar'
      text.path=data/emoji/tokenizer.json run.output=outputs/demo/clip run.steps=600

Writes OUTPUT/ in Hugging Face's CLIP layout (config.json, model.safetensors, tokenizer,
preprocessor_config.json), which launch/sample.py --clip OUTPUT loads, and OUTPUT/retrieval.json
with the validation retrieval accuracy.
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.core.config import parse_cli
from dalle_repro.train.clip import ClipTrainConfig, chance_note, train_clip


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(ClipTrainConfig, argv, __doc__ or "")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # the precision picked, and why
    try:
        metrics = train_clip(cfg)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    print(f"saved {cfg.run.output}: {chance_note(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
