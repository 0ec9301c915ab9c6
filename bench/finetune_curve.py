"""Fine-tuning the demo's prior on scenes with its held-out pairs: accuracy before and after, against updates.

The demo's prior never saw a red triangle, a green circle or a blue square. This fine-tunes it
(configs/demo/finetune.yaml: init.export, a tenth of the learning rate, a short warm-up) on a few
hundred new scenes, half of them using those pairs, for each of ``steps`` updates (a run each, its
schedule over its own length), and evaluates every result as the demo does (tools/evaluate.py's
zero-shot report on the demo's own seen and held-out captions): what is learnt (held out) and what
is forgotten (seen). The new scenes are rendered and encoded with the demo's dVAE first when
``data`` does not exist yet (tools/make_shapes_dataset.py, tools/encode_tokens.py). One process
(DeepSpeed without a launcher), so updates are one rank's: ``batch`` sequences each.

Usage: python bench/finetune_curve.py --demo outputs/demo --out OUT [--steps 50 150 300]
Writes OUT/curve.json and prints a Markdown table (docs/finetune.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_repro.core.cli import flag_aliases, parse_cli  # noqa: E402
from dalle_repro.core.config import arg, load_config  # noqa: E402
from dalle_repro.evaluation.evaluate import zero_shot  # noqa: E402
from dalle_repro.sample.export import load_prior  # noqa: E402
from dalle_repro.sample.generate import SampleSettings  # noqa: E402
from dalle_repro.sample.rerank import Reranker  # noqa: E402


@dataclass
class CurveArgs:
    """The fine-tuning curve's settings."""

    demo: str = arg("outputs/demo", "The demo's output folder (prior/export, dvae/dvae, clip).")
    shapes: str = arg("data/shapes", "The demo's scenes: its val/ and heldout/ are the evaluation's captions.")
    data: str = arg("data/shapes-ft", "The new scenes (made here when missing); their tokens go to DATA-tokens.")
    out: str = arg("bench-out/finetune", "Folder for the runs and curve.json.")
    steps: list[int] = arg(factory=lambda: [50, 150, 300], doc="Fine-tuning updates of each run.", gt=0)
    batch: int = arg(32, "Sequences per update (one rank).", gt=0)
    candidates: int = arg(8, "Samples per caption in the evaluation.", gt=0)
    captions: int = arg(96, "Distinct captions per split.", gt=0)
    freeze: list[str] = arg(factory=list, doc="init.freeze of the runs.")


def make_data(a: CurveArgs, dvae: Path) -> Path:
    from dalle_repro.cli.encode_tokens import main as encode
    from dalle_repro.cli.make_shapes_dataset import main as make

    tokens = Path(f"{a.data}-tokens")
    if not Path(a.data).exists():
        args = ["--output", a.data, "--train", "400", "--heldout", "400", "--seed", "1", "--shard-size", "100"]
        if make(args) != 0:
            raise SystemExit("make_shapes_dataset failed")
    if not tokens.exists():
        if encode(["--dvae", str(dvae), "--shards", f"{a.data}/*/*.tar", "--output", str(tokens)]) != 0:
            raise SystemExit("encode_tokens failed")
    return tokens


def evaluate(export: Path, reranker: Reranker, a: CurveArgs) -> dict:
    prior = load_prior(export)
    prior.use_trained_precision()
    settings = SampleSettings(candidates=a.candidates, keep=1, temperature=0.7, guidance=2.0, batch_size=None)
    r = zero_shot(prior, reranker, f"{a.shapes}/val/*.tar", f"{a.shapes}/heldout/*.tar", settings, a.captions)
    out = {}
    for split, rep in r["splits"].items():
        t = rep["tasks"]["reranked"]
        out[split] = {k: t[k] for k in ("all", "shape", "colour", "colour_shape_binding")}
    return out


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(CurveArgs, argv, __doc__ or "", aliases=flag_aliases(CurveArgs))
    if a is None:
        return 0
    from dalle_repro.train.prior import train
    from dalle_repro.train.prior_config import PriorTrainConfig

    demo = Path(a.demo)
    export = demo / "prior" / "export"
    tokens = make_data(a, demo / "dvae" / "dvae")
    reranker = Reranker(demo / "clip")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [{"updates": 0, "seconds": 0.0, **evaluate(export, reranker, a)}]
    print(json.dumps(rows[-1]), flush=True)
    for n in a.steps:
        run = out / f"ft{n}"
        overrides = [
            f"init.export={export}",
            f"init.freeze=[{','.join(a.freeze)}]",
            f"text.path={export}/tokenizer.json",
            f"data.shards={tokens}/heldout/*.tar,{tokens}/train/*.tar",
            f"data.batch_size={a.batch}",
            f"run.val_shards={tokens}/val/*.tar",
            f"run.run_dir={run}",
            f"run.steps={n}",
            f"run.ckpt_every={n}",
            f"run.val_every={n}",
        ]
        cfg = load_config(PriorTrainConfig, ROOT / "configs/demo/finetune.yaml", overrides)
        t1 = time.perf_counter()
        train(dataclasses.replace(cfg))
        rows.append(
            {"updates": n, "seconds": round(time.perf_counter() - t1, 1), **evaluate(run / "export", reranker, a)}
        )
        print(json.dumps(rows[-1]), flush=True)
        (out / "curve.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1) + "\n")
    (out / "curve.json").write_text(
        json.dumps({"args": vars(a), "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n"
    )

    def cell(s: dict) -> str:
        return f"{100 * s['rate']:.1f}% [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"

    print("| updates | seen: all right | held out: all right | held out: colour-shape binding | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        b = r["heldout"]["colour_shape_binding"]
        print(
            f"| {r['updates']} | {cell(r['seen']['all'])} | {cell(r['heldout']['all'])} | {cell(b)} | {r['seconds']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
