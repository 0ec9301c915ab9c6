"""Train the dVAE (stage 1).

Usage:
  python launch/train_dvae.py --config configs/demo/dvae.yaml [--resume] [key.sub=value ...]
  deepspeed --num_gpus N launch/train_dvae.py --config ...      (data-parallel; DS_ACCELERATOR=cpu on CPU)

Writes RUN/config.yaml, RUN/metrics.jsonl, RUN/checkpoints/step_*/, RUN/grids/*.png and, at the
end, RUN/dvae/ (config.yaml + model.safetensors with the EMA weights), which DVAE.from_pretrained
and tools/encode_tokens.py read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dalle_repro.config import ConfigError, cli_help, load_config
from dalle_repro.train_dvae import DVAETrainConfig, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher; env has it too
    p.add_argument("-h", "--help", action="store_true")
    a, overrides = p.parse_known_args(argv)
    if a.help:
        print(cli_help(DVAETrainConfig, __doc__ or ""))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(DVAETrainConfig, a.config, overrides)
        val = train(cfg, resume_run=a.resume)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if val:
        print(json.dumps(val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
