"""How often the demo's dVAE falls onto one code in its first updates, per seed.

For each seed: the demo's dVAE config (configs/demo/dvae.yaml, with ``--edits``), a fresh model and
AdamW, and the trainer's own ``train_step`` on batches drawn from ``--scenes`` rendered scenes of
``--world`` (shapes or strokes); the codes used in the batch (argmax of the encoder's logits over
every position of the 32 images) and the perplexity of those codes' frequencies at update 1, 20 and
the last. A run still on one code at the end
has collapsed: its decoder draws the mean image whatever the code, and nothing downstream can learn.
One thread, so that several seeds run side by side on a small machine without timing anything.

Usage: python bench/dvae_collapse.py --world shapes --steps 150 --seeds 0 1 2 3 [--edits schedule.lr_warmup_steps=100]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composition_sweep import edited, scenes, train_dvae  # noqa: E402

from dalle_repro.core.cli import flag_aliases, parse_cli  # noqa: E402
from dalle_repro.core.config import arg  # noqa: E402
from dalle_repro.train.dvae import DVAETrainConfig  # noqa: E402


@dataclass
class CollapseArgs:
    """The collapse count's settings."""

    world: Literal["shapes", "strokes"] = arg("shapes", "The data set.")
    steps: int = arg(150, "Updates per seed.", gt=1)
    seeds: list[int] = arg(factory=lambda: list(range(8)), doc="Seeds of the weights and the batches.")
    edits: str = arg("", "key=value,key=value edits of configs/demo/dvae.yaml.")
    scenes: int = arg(2000, "Rendered training scenes.", gt=0)
    out: str | None = arg(None, "A JSON file for the results.")


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(CollapseArgs, argv, __doc__ or "", aliases=flag_aliases(CollapseArgs))
    if a is None:
        return 0
    torch.set_num_threads(1)
    _, images = scenes(a.scenes, False, 0, 32, 1, a.world)
    rows = []
    for seed in a.seeds:
        cfg = edited(
            "configs/demo/dvae.yaml", DVAETrainConfig, ",".join(e for e in (a.edits, f"run.steps={a.steps}") if e)
        )
        used: dict[int, int] = {}
        perplexity: dict[int, float] = {}

        def record(update: int, metrics: dict, used: dict[int, int] = used, ppl: dict[int, float] = perplexity) -> None:
            if update in (1, 20, a.steps):
                used[update] = int(metrics["batch_codes_used"])
                ppl[update] = round(float(metrics["batch_perplexity"]), 1)

        train_dvae(cfg, images, torch.device("cpu"), seed, record)
        rows.append({"seed": seed, "codes_used": used, "perplexity": perplexity, "collapsed": used[a.steps] <= 1})
        print(json.dumps(rows[-1]), flush=True)
    n = sum(r["collapsed"] for r in rows)
    print(f"{a.world}, edits {a.edits or 'none'}: on one code at update {a.steps}: {n} of {len(rows)} seeds")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
