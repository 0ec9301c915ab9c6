"""Train the dVAE (stage 1).

Usage:
  python launch/train_dvae.py --config configs/demo/dvae.yaml [--resume] [key.sub=value ...]
  deepspeed --num_gpus N launch/train_dvae.py --config ...      (data-parallel; DS_ACCELERATOR=cpu on CPU)

Writes RUN/config.yaml, RUN/metrics.jsonl, RUN/checkpoints/step_*/, RUN/grids/*.png and, at the
end, RUN/dvae/ (config.yaml + model.safetensors with the EMA weights), which DVAE.from_pretrained
and tools/encode_tokens.py read. SIGTERM writes a checkpoint and exits with status 0; --resume
continues. Exit status 2: a config or input error; 3: too many non-finite losses in a row, or a
collapsed codebook (`loss.collapse_codes`).
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.cli.errors import print_written, run_trainer
from dalle_repro.core.cli import parse_cli
from dalle_repro.train.dvae import DVAETrainConfig, train


def main(argv: list[str] | None = None) -> int:
    cfg, flags = parse_cli(DVAETrainConfig, argv, __doc__ or "", flags=("--resume",))
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    code, result = run_trainer(lambda stop: train(cfg, resume_run=flags["resume"], stop=stop))
    if code == 0 and result:
        print(json.dumps(result))
    if code == 0:
        print_written(cfg.run.run_dir, "dvae", "dVAE tools/encode_tokens.py reads")
    return code


if __name__ == "__main__":
    sys.exit(main())
