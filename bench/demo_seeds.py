"""Several demo runs (one per seed) side by side: the zero-shot numbers with intervals, their mean over
seeds, the ceilings, and the time plan against what each training stage took.

Each argument is a demo output folder (``out_dir``, e.g. outputs/demo) of a finished run. Per run
and split it reads ``evaluation/evaluation.json``: all attributes right for CLIP's pick and for a
random pick (with the 95% Wilson interval of that run's captions), shape and colour-shape binding
for CLIP's pick, the reader's pick (the best any reranker could pick) and the reader's and the
dVAE's ceilings; and ``plan.json`` with the stage markers
(``stages/*.json``): each stage's predicted minutes at the planned updates beside its measured
minutes, and the evaluation's minutes. Over the runs: the mean of each share and a 95% interval of
that mean across seeds (t distribution), which is the run-to-run spread the single-run intervals
do not show. Writes OUT (a JSON file) when given and prints Markdown tables.

Usage: python bench/demo_seeds.py RUN_OUT [RUN_OUT ...] [--out seeds.json]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load(out: Path) -> dict[str, Any]:
    ev = json.loads((out / "evaluation" / "evaluation.json").read_text())
    row: dict[str, Any] = {"run": str(out)}
    for split, rep in ev["splits"].items():
        t = rep["tasks"]
        row[split] = {
            "clip_all": t["reranked"]["all"],
            "random_all": t["random_pick"]["all"],
            "clip_shape": t["reranked"]["shape"],
            "clip_binding": t["reranked"].get("colour_shape_binding"),
            "reader_pick": t.get("reader_pick", {}).get("all"),  # evaluations since 255c269
            "reader": rep["ceilings"]["reader"]["all"],
            "dvae": rep["ceilings"].get("dvae", {}).get("all"),
            "codes_used": rep.get("dvae_ceiling", {}).get("codes_used"),
        }
    plan_path = out / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        row["plan"] = {}
        for stage in ("dvae", "prior", "clip"):
            marker = out / "stages" / f"{stage}.json"
            if not marker.is_file():
                continue
            took = json.loads(marker.read_text())["seconds"] / 60
            configured = plan["predicted_minutes_configured"][stage]
            predicted = configured * plan["planned_updates"][stage] / plan["configured_updates"][stage]
            row["plan"][stage] = {"predicted_min": round(predicted, 2), "took_min": round(took, 2)}
        row["fraction"] = plan.get("fraction")
    marker = out / "stages" / "evaluate.json"
    if marker.is_file():
        row["evaluate_min"] = round(json.loads(marker.read_text())["seconds"] / 60, 2)
    return row


def mean_ci(values: list[float]) -> tuple[float, float | None, float | None]:
    """The mean of the shares and its 95% t-interval across runs, clipped to [0, 1]; no interval for
    one run (None, which JSON can hold, where NaN is not JSON)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return m, max(0.0, m - half), min(1.0, m + half)  # shares: the interval is clipped to [0, 1]


def pct(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"{100 * s['rate']:.1f}% [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    out_file = None
    if "--out" in args:
        i = args.index("--out")
        out_file = Path(args[i + 1])
        del args[i : i + 2]
    rows = []
    for a in args:
        p = Path(a)
        if not (p / "evaluation" / "evaluation.json").is_file():
            print(f"error: {p}/evaluation/evaluation.json not found: not a finished demo run", file=sys.stderr)
            return 2
        rows.append(load(p))
    keys = ("clip_all", "random_all", "clip_shape", "clip_binding", "reader_pick", "reader", "dvae")
    print(
        "| run | split | CLIP's pick: all right | random pick | shape (CLIP's pick) | colour-shape binding "
        "| reader's pick | reader | dVAE |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for split in ("seen", "heldout"):
            print(
                f"| {Path(r['run']).parent.parent.name or r['run']} | {split} | "
                + " | ".join(pct(r[split][k]) for k in keys)
                + " |"
            )
    summary: dict[str, Any] = {}
    for split in ("seen", "heldout"):
        summary[split] = {}
        for k in keys:
            vals = [r[split][k]["rate"] for r in rows if r[split].get(k)]
            if vals:
                m, lo, hi = mean_ci(vals)
                summary[split][k] = {"mean": m, "ci_over_seeds": [lo, hi], "runs": len(vals), "values": vals}
    print()
    print(f"Mean over {len(rows)} runs, with the 95% interval of the mean across runs (t distribution):")
    print()
    print("| split | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for split in ("seen", "heldout"):
        cells = []
        for k in keys:
            s = summary[split].get(k)
            if not s:
                cells.append("-")
            elif s["ci_over_seeds"][0] is None:
                cells.append(f"{100 * s['mean']:.1f}% (one run)")
            else:
                lo, hi = s["ci_over_seeds"]
                cells.append(f"{100 * s['mean']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
        print(f"| {split} | " + " | ".join(cells) + " |")
    if any("plan" in r for r in rows):
        print()
        print("| run | plan fraction | dVAE predicted / took (min) | prior | CLIP | evaluation (min) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            p = r.get("plan", {})
            cells = [
                f"{p[s]['predicted_min']} / {p[s]['took_min']}" if s in p else "-" for s in ("dvae", "prior", "clip")
            ]
            print(f"| {r['run']} | {r.get('fraction')} | " + " | ".join(cells) + f" | {r.get('evaluate_min', '-')} |")
    if out_file is not None:
        from dalle_repro.core.files import atomic_write_text

        atomic_write_text(out_file, json.dumps({"runs": rows, "summary": summary}, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
