"""Train a small CLIP on image shards, for reranking without downloads (the demo's reranker).

Usage: python tools/train_clip.py [--config FILE] [--resume] [key.sub=value ...]

Example:
  python tools/train_clip.py 'data.shards=data/emoji/train/*.tar' 'run.val_shards=data/emoji/val/*.tar'
      text.path=data/emoji/tokenizer.json run.run_dir=outputs/demo/clip run.steps=600

Writes RUN/config.yaml, RUN/metrics.jsonl, RUN/checkpoints/step_*/ and, at the end, RUN/clip/ in
Hugging Face's CLIP layout (config.json, model.safetensors, tokenizer, preprocessor_config.json),
which launch/sample.py --clip RUN/clip loads, with RUN/clip/retrieval.json holding the validation
retrieval accuracy. SIGTERM writes a checkpoint and exits with status 0; --resume continues.
Exit status 2: a config or input error; 3: too many non-finite losses in a row.
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.cli.errors import run_trainer
from dalle_repro.core.cli import parse_cli
from dalle_repro.train.clip import ClipTrainConfig, chance_note, clip_folder, train_clip


def main(argv: list[str] | None = None) -> int:
    cfg, flags = parse_cli(ClipTrainConfig, argv, __doc__ or "", flags=("--resume",))
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # the precision picked, and why
    code, result = run_trainer(lambda stop: train_clip(cfg, resume_run=flags["resume"], stop=stop))
    if code:
        return code
    print(json.dumps(result))
    if result.get("ended") == "done" and "image_to_text_top1" in result:
        print(f"saved {clip_folder(cfg)}: {chance_note(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
