"""Composition against compute: the demo configuration at several multiples of its updates.

Does more training buy composition, or only memory? For each factor (default 0.5, 1, 2, 4) this
runs the whole demo (``python -m dalle_repro.cli.demo``) with every training stage's updates and
schedules (the dVAE's tau, KL and lr schedules, the prior's warm-up and decay, the CLIP's steps,
and their checkpoint/validation intervals) multiplied by the factor and the time plan off
(``train_minutes: null``), one seed each, in ``OUT/x{factor}/``. The runs share the data set and
its tokenizer (the config's data folder, rebuilt for ``--seed``: one clone per seed); each has its
own dVAE, token shards, prior and CLIP. A run that stopped continues where it stopped (the demo's
stages resume), so the script can be killed and started again.

At the end it reads each run's zero-shot evaluation and stage times and writes ``OUT/curve.json``,
``OUT/curve.md`` (a table: training minutes as measured and at the 1x run's cost per update, which
a run that shared the cores does not inflate; all attributes right with CLIP's pick on seen and
held-out captions with 95% intervals, shape on held-out, the dVAE ceilings) and a plot of seen and
held-out accuracy against training minutes (``--plot``, default OUT/curve.png; docs/ keeps one).
It is a benchmark: about 10 + 20 + 40 + 80 minutes of training on a 2-core CPU, so run it in the
background and nothing else beside it when the minutes matter.

Usage: python bench/composition_curve.py [--out outputs/curve] [--factors 0.5 1 2 4]
       [--demo configs/demo/demo.yaml] [--seed 0] [--collect-only] [--plot PATH]
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import arg, load_config, load_yaml
from dalle_repro.demo.config import DemoConfig, clip_config, dvae_config, prior_config
from dalle_repro.demo.plan import SCALED_KEYS

TRAINING = ("dvae", "prior", "clip")


def multiplied(config: Any, keys: tuple[str, ...], factor: float) -> list[str]:
    """``key=value`` overrides setting each update count of ``config`` to ``factor`` times its value
    (at least 1; 0 and unset stay as they are)."""
    out = []
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value:
            out.append(f"{key}={max(1, math.floor(value * factor))}")
    return out


def run_config(base: Path, out: Path, factor: float, seed: int) -> dict[str, Any]:
    """The demo YAML of one run: the base config, its own output folders, the time plan off, ``seed``
    for the scenes of its data set (shapes or strokes), every model and the evaluation's sampling,
    and every training stage's updates multiplied by ``factor``."""
    data = load_yaml(base)
    data |= {"out_dir": str(out), "tokens_output": str(out / "tokens"), "train_minutes": None}
    cfg = load_config(DemoConfig, base, [f"out_dir={out}", f"tokens_output={out / 'tokens'}", "train_minutes=null"])
    data.setdefault(cfg.dataset, {})["seed"] = seed
    data.setdefault("evaluation", {}).setdefault("sample", {})["seed"] = seed
    configs = {"dvae": dvae_config(cfg, plan=False), "prior": prior_config(cfg, plan=False)}
    for stage in ("dvae", "prior"):
        own = list(data.get(f"{stage}_overrides") or [])
        data[f"{stage}_overrides"] = [*own, f"run.seed={seed}", *multiplied(configs[stage], SCALED_KEYS[stage], factor)]
    clip = data.setdefault("clip", {}).setdefault("run", {})
    clip["steps"] = max(1, math.floor(clip_config(cfg, plan=False).run.steps * factor))
    clip["seed"] = seed
    return data


def stage_seconds(out: Path) -> dict[str, float]:
    seconds = {}
    for name in TRAINING:
        marker = out / "stages" / f"{name}.json"
        if marker.is_file():
            seconds[name] = float(json.loads(marker.read_text()).get("seconds") or 0.0)
    return seconds


def collect(out: Path, factor: float) -> dict[str, Any] | None:
    """One finished run's point of the curve, or None when its evaluation is not written yet."""
    path = out / "evaluation" / "evaluation.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    seconds = stage_seconds(out)
    point: dict[str, Any] = {"factor": factor, "training_minutes": round(sum(seconds.values()) / 60, 2)}
    point["stage_minutes"] = {k: round(v / 60, 2) for k, v in seconds.items()}
    plan = out / "plan.json"
    if plan.is_file():
        point["updates"] = json.loads(plan.read_text()).get("planned_updates")
    for split, rep in ev["splits"].items():
        tasks = rep.get("tasks", {}).get("reranked", {})
        point[split] = {
            "all": tasks.get("all") or {"rate": rep["attributes"]["reranked"]["all"]},
            "shape": tasks.get("shape") or {"rate": rep["attributes"]["reranked"]["shape"]},
            "dvae_ceiling": rep.get("dvae_ceiling", {}).get("all"),
        }
    return point


def add_compute(points: list[dict[str, Any]]) -> None:
    """Each point's ``compute_minutes``: its updates at the reference run's seconds per update, stage
    by stage (the reference: the 1x run, else the first with its updates and stage times). A run that
    shared the cores with another job took longer than its updates cost; this measure of its compute
    does not see that. Without updates a point keeps its measured minutes."""
    known = [p for p in points if p.get("updates") and p.get("stage_minutes")]
    ref = next((p for p in known if p["factor"] == 1), known[0] if known else None)
    for p in points:
        if ref is None or p not in known:
            p["compute_minutes"] = p["training_minutes"]
            continue
        cost = {k: ref["stage_minutes"][k] / ref["updates"][k] for k in ref["stage_minutes"] if ref["updates"].get(k)}
        p["compute_minutes"] = round(sum(p["updates"][k] * c for k, c in cost.items() if k in p["updates"]), 2)


def table(points: list[dict[str, Any]]) -> str:
    def cell(s: dict[str, Any]) -> str:
        ci = s.get("ci")
        return f"{s['rate']:.1%}" + (f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]" if ci else "")

    rows = [
        "| updates | training minutes: measured / at 1x's cost per update | seen: all right (CLIP's pick) "
        "| held out: all right | held out: shape | dVAE ceiling seen / held out |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        ceilings = [p[s]["dvae_ceiling"] for s in ("seen", "heldout")]
        ceil = " / ".join(f"{c:.0%}" if c is not None else "n/a" for c in ceilings)
        rows.append(
            f"| {p['factor']:g}x | {p['training_minutes']:.1f} / {p.get('compute_minutes', p['training_minutes']):.1f} "
            f"| {cell(p['seen']['all'])} "
            f"| {cell(p['heldout']['all'])} | {cell(p['heldout']['shape'])} | {ceil} |"
        )
    return "\n".join(rows) + "\n"


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for split, colour in (("seen", "tab:blue"), ("heldout", "tab:red")):
        xs = [p.get("compute_minutes", p["training_minutes"]) for p in points]
        ys = [p[split]["all"]["rate"] for p in points]
        lo = [y - p[split]["all"].get("ci", [y, y])[0] for y, p in zip(ys, points, strict=True)]
        hi = [p[split]["all"].get("ci", [y, y])[1] - y for y, p in zip(ys, points, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colour, label=f"{split} captions")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training minutes (dVAE + prior + CLIP) at 1x's cost per update")
    ax.set_ylabel("all attributes right, CLIP's pick")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@dataclass
class CurveArgs:
    """The compute curve's settings."""

    out: str = arg("outputs/curve", "Folder of the runs and the curve.")
    factors: list[float] = arg(factory=lambda: [0.5, 1.0, 2.0, 4.0], doc="Multiples of the updates.", gt=0)
    demo: str = arg(
        "configs/demo/demo.yaml", "The demo config the runs start from (configs/demo/strokes.yaml: the strokes set)."
    )
    seed: int = arg(0, "Seed of the scenes and of every model.", ge=0)
    collect_only: bool = arg(False, "Only read finished runs and write the curve.")
    plot: str | None = arg(None, "Where to draw the plot; null: OUT/curve.png.")


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(CurveArgs, argv, __doc__ or "", aliases=flag_aliases(CurveArgs))
    if a is None:
        return 0
    out = Path(a.out)
    for factor in a.factors:
        run_dir = out / f"x{factor:g}"
        if a.collect_only or collect(run_dir, factor) is not None:
            continue
        # the config and log lie beside the run's folder: the demo makes that folder itself (and refuses
        # to replace one it did not make)
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / f"x{factor:g}.yaml"
        cfg_path.write_text(json.dumps(run_config(Path(a.demo), run_dir, factor, a.seed), indent=1) + "\n")
        print(f"[curve] {factor:g}x: python -m dalle_repro.cli.demo --config {cfg_path}", flush=True)
        with open(out / f"x{factor:g}.log", "a") as log:
            code = subprocess.run(
                [sys.executable, "-m", "dalle_repro.cli.demo", "--config", str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            ).returncode
        if code != 0:
            print(f"[curve] {factor:g}x failed (exit {code}): see {out / f'x{factor:g}.log'}", file=sys.stderr)
            return code
    points = [pt for f in a.factors if (pt := collect(out / f"x{f:g}", f)) is not None]
    if not points:
        print("[curve] no finished run to collect", file=sys.stderr)
        return 1
    add_compute(points)
    (out / "curve.json").write_text(json.dumps(points, indent=1) + "\n")
    (out / "curve.md").write_text(table(points))
    plot(points, Path(a.plot) if a.plot else out / "curve.png")
    print(table(points), end="")
    print(f"[curve] wrote {out / 'curve.json'}, {out / 'curve.md'} and the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
