"""Train the prior (stage 2) under DeepSpeed.

Usage:
  deepspeed --num_gpus N launch/train_prior.py --config configs/demo/prior.yaml [--resume] [key.sub=value ...]
  python launch/train_prior.py --config ...                   (one process; DeepSpeed still runs the engine)
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train_prior.py ...      (2 CPU ranks)

Multi-node: `deepspeed --hostfile hosts.txt launch/train_prior.py ...` (ssh to each host), or one
`deepspeed --no_ssh --node_rank K --hostfile hosts.txt --master_addr HOST0 --master_port P ...` per
node (SLURM: one task per node with K=$SLURM_NODEID); see docs/tools.md.

Writes RUN/config.yaml, RUN/deepspeed.json (the engine's config), RUN/metrics.jsonl,
RUN/checkpoints/ (DeepSpeed's and ours), RUN/samples/*.png and, at the end, RUN/export/, which
launch/sample.py loads without DeepSpeed. SIGTERM writes a checkpoint and exits with status 0.
Exit status 2: a config or input error; 3: too many non-finite losses in a row.
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.cli.errors import print_written, run_trainer
from dalle_repro.core.cli import parse_cli
from dalle_repro.train.prior import train
from dalle_repro.train.prior_config import PriorTrainConfig


def main(argv: list[str] | None = None) -> int:
    cfg, flags = parse_cli(PriorTrainConfig, argv, __doc__ or "", flags=("--resume",))
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    code, result = run_trainer(lambda stop: train(cfg, resume_run=flags["resume"], stop=stop))
    if code == 0:
        print(json.dumps(result))
        print_written(cfg.run.run_dir, "export", "export launch/sample.py loads")
    return code


if __name__ == "__main__":
    sys.exit(main())
