"""The demo's report: ``OUT/report.md`` and ``OUT/report.html`` (images inline), with the zero-shot
numbers first (shapes set), then the settings and metrics of every stage, loss curves, the dVAE's
reconstruction grid and the reranked sample grids. The evaluation's plots are matplotlib's
(evaluation/evaluate.py); the loss curves are drawn with PIL."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dalle_repro.core.config import load_yaml
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.images import save_png
from dalle_repro.data.shapes import UNLABELLED
from dalle_repro.evaluation.tasks import FAILURES, TASKS, fmt
from dalle_repro.train.metrics import read_metrics

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def line_plot(
    series: dict[str, list[tuple[float, float]]], title: str, size: tuple[int, int] = (560, 300)
) -> Image.Image:
    """Lines of (x, y) points with axes, min/max labels and a legend."""
    w, h = size
    left, right, top, bottom = 56, 12, 24, 28
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pts = [p for s in series.values() for p in s]
    if not pts:
        d.text((left, h // 2), "no data", fill="black")
        return im
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="#888888")
    d.text((4, 4), title, fill="black")
    d.text((4, top), f"{y1:.3g}", fill="black")
    d.text((4, h - bottom - 10), f"{y0:.3g}", fill="black")
    d.text((left, h - bottom + 6), f"{x0:g}", fill="black")
    d.text((w - right - 40, h - bottom + 6), f"{x1:g}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        if len(s) > 1:
            d.line([xy(*p) for p in s], fill=c, width=2)
        elif s:
            x, y = xy(*s[0])
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
        d.text((w - right - 150, top + 4 + 12 * i), name, fill=c)
    return im


def curves(run_dir: Path, keys: list[str], out: Path, title: str) -> Path:
    rows = read_metrics(run_dir)
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    return save_png(line_plot({k: v for k, v in series.items() if v}, title), out)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>&~])")
_MD_ESCAPED = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>&~])")


def md_text(text: str) -> str:
    """``text`` (a caption: someone else's words) as literal Markdown text on one line: every
    character Markdown or HTML gives a meaning is backslash-escaped, so that ``<script>`` or a link
    in a caption is shown, not run or followed, in viewers that render report.md."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _unescape_md(text: str) -> str:
    return _MD_ESCAPED.sub(r"\1", text)


def _img_md(path: Path, base: Path) -> str:
    return f"![{path.name}]({path.relative_to(base) if path.is_relative_to(base) else path})"


def write_report(out_dir: str | Path, results: dict[str, dict[str, Any]], stage_settings: dict[str, Any]) -> Path:
    """Write report.md and report.html from the stages' results (see demo/pipeline.py)."""
    out = Path(out_dir)
    plots = out / "plots"
    md: list[str] = ["# dalle-repro demo report", ""]
    shapes = "heldout" in results.get("data", {})  # a compositional set: shapes or strokes
    worlds = {
        "shapes": "the shapes set (scenes of coloured shapes, some colour-shape pairs held out)",
        "strokes": "the strokes set (thin and thick coloured strokes on textured paper, some colour-form pairs "
        "held out; never used for tuning)",
    }
    data = worlds[results["data"].get("world", "shapes")] if shapes else "the emoji"
    md += [
        f"The whole DALL-E pipeline on {data}, on this machine's CPU: shards, BPE tokenizer, dVAE, token "
        "shards, the prior (under the deepspeed launcher), a small CLIP, reranked samples"
        + (", and the zero-shot evaluation." if shapes else "."),
        "",
    ]
    ev = results.get("evaluate", {})
    if ev.get("splits"):
        md += zero_shot_section(ev, results.get("dvae", {}).get("trained_on"))
    dv, pr, cl, sm = (results.get(k, {}) for k in ("dvae", "prior", "clip", "samples"))
    md += ["## Metrics", "", "| stage | metric | value |", "|---|---|---|"]
    rows = [
        ("dVAE", "validation bits/dim (hard codes)", dv.get("val_rec_bpd")),
        ("dVAE", "validation PSNR (dB)", dv.get("val_psnr")),
        ("dVAE", "codes used on validation / codebook", f"{dv.get('val_codes_used')} / {dv.get('vocab_size', '?')}"),
        ("dVAE", "code perplexity", dv.get("val_perplexity")),
        ("dVAE", "trained on", _trained_on(dv.get("trained_on"))),
        ("prior", "validation loss (1/8 text + 7/8 image)", pr.get("val_loss")),
        ("prior", "validation text loss (nats/token)", pr.get("val_text_loss")),
        ("prior", "validation image loss (nats/token)", pr.get("val_image_loss")),
        ("CLIP", "image->text top-1 / top-5 on validation", _pair(cl, "image_to_text_top1", "image_to_text_top5")),
        ("CLIP", "chance top-1", cl.get("chance_top1")),
        ("rerank", "mean CLIP score, kept images", sm.get("mean_score_kept")),
        ("rerank", "mean CLIP score, a random pick (all candidates)", sm.get("mean_score_all")),
        ("rerank", "gain (kept - random)", sm.get("rerank_gain")),
    ]
    md += [f"| {a} | {b} | {_fmt(c)} |" for a, b, c in rows]
    md += [""] + plan_lines(results.get("plan", {}), stage_settings, results)
    images: list[tuple[str, Path]] = []
    for key, title in (
        ("fid_by_blur", "FID against blur radius"),
        ("heldout_vs_nearest", "Held-out captions: samples beside the nearest training caption"),
        ("attributes", "Attributes read back from samples, seen and held-out captions"),
        ("best_of_n", "Best of N by CLIP"),
    ):
        if Path(ev.get("plots", {}).get(key, "")).is_file():
            images.append((title, Path(ev["plots"][key])))
    if dv.get("run_dir"):
        p = curves(Path(dv["run_dir"]), ["nll_bpd", "val_rec_bpd"], plots / "dvae_loss.png", "dVAE: bits/dim")
        images.append(("dVAE training curve", p))
        if Path(dv.get("grid", "")).is_file():
            images.append(("dVAE reconstructions (original, reconstruction) on validation", Path(dv["grid"])))
    if pr.get("run_dir"):
        keys = ["image_loss", "text_loss", "val_image_loss", "val_text_loss"]
        images.append(
            ("Prior training curves", curves(Path(pr["run_dir"]), keys, plots / "prior_loss.png", "prior: loss"))
        )
    for entry in sm.get("prompts", []):
        label = f'Samples for "{md_text(entry["caption"])}" ({md_text(entry["split"])}), best CLIP score first'
        images.append((label, Path(entry["grid"])))
    md += ["## Pictures", ""]
    for title, p in images:
        md += [f"### {title}", "", _img_md(p, out), ""]
    md += ["## Settings of every stage", ""]
    for name, s in stage_settings.items():
        # backticks and HTML's characters (only ever inside a JSON string) as \uXXXX escapes: no
        # caption can close the fence or be read as HTML by a lax viewer
        settings = json.dumps(s, indent=1, default=str)[:4000]
        for ch in "`<>&":
            settings = settings.replace(ch, f"\\u{ord(ch):04x}")
        md += [f"### {name}", "", "```json", settings, "```", ""]
    md += playground_lines(out)
    text = "\n".join(md) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", _html(md, images, out))
    return out / "report.md"


def playground_lines(out: Path) -> list[str]:
    """The report's last lines: the command that opens the playground on the model just trained."""
    export, clip = out / "prior" / "export", out / "clip"
    if not (export / "export.json").is_file():
        return []
    cmd = f"python launch/serve.py --model {export}" + (f" --clip {clip}" if (clip / "config.json").is_file() else "")
    return [
        "## Try it",
        "",
        "Open the playground on this model (a page at http://127.0.0.1:8000/ and a JSON API; see "
        "`launch/serve.py --help`):",
        "",
        "```bash",
        cmd,
        "```",
        "",
    ]


def plan_lines(
    plan: dict[str, Any], stage_settings: dict[str, Any] | None = None, results: dict[str, Any] | None = None
) -> list[str]:
    """What the demo's time plan (demo/plan.py) decided on this machine, and each training stage's
    predicted minutes beside what it took (the stage markers' seconds) and the updates it trained
    (its ``run.end_by`` may have changed its length: train/loop.py's LengthPlan)."""
    if "predicted_minutes_configured" not in plan:
        return []
    full = sum(plan["predicted_minutes_configured"].values())
    f = plan["fraction"]
    runs = ", ".join(f"{k} {v}" for k, v in plan["planned_updates"].items())
    md = [
        f"Time plan: the configured training would take about {full:.1f} minutes on this machine (timed "
        f"updates x measured factors); the budget is {plan['train_minutes']:g} (`train_minutes`), so the "
        f"demo planned {100 * f:.0f}% of it: {runs} updates (`plan.json`). Each stage then timed its own "
        "updates, forecast its end once a tenth of them had run, and fitted its length to what the budget "
        "had left for it (`run.end_by`).",
        "",
    ]
    rows = plan_table(plan, stage_settings or {}, results or {})
    if rows:
        md += [
            "| stage | predicted | actual | actual / predicted | its own forecast (actual / it) "
            "| updates trained (planned) | ended before deadline |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    return md


def plan_table(plan: dict[str, Any], stage_settings: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """A row per planned stage that has run: predicted and actual minutes, their ratio, the stage's
    own forecast of its minutes once a tenth of its updates had run (LengthPlan), the updates it
    trained against the plan's, and how long before its deadline it ended; then the sum."""
    rows, total_p, total_a = [], 0.0, 0.0
    for key, minutes in plan["predicted_minutes_configured"].items():
        seconds = stage_settings.get(key, {}).get("seconds")
        if seconds is None:
            continue
        predicted, actual = minutes * plan["fraction"], seconds / 60
        total_p, total_a = total_p + predicted, total_a + actual
        ratio = f"{actual / predicted:.2f}" if predicted > 0 else "n/a"
        result = results.get(key, {})
        trained = result.get("step")
        updates = f"{trained} ({plan['planned_updates'].get(key)})" if trained is not None else "n/a"
        before = result.get("ended_before_end_by_s")
        slack = f"{before:.0f} s" if isinstance(before, (int, float)) else "n/a"
        error = (result.get("forecast") or {}).get("end_error_s")
        # the stage's own forecast, from its first tenth: its end, as minutes from the stage's start
        own = f"{actual - error / 60:.1f} min ({actual / (actual - error / 60):.2f})" if error is not None else "n/a"
        rows.append(f"| {key} | {predicted:.1f} min | {actual:.1f} min | {ratio} | {own} | {updates} | {slack} |")
    if rows:
        ratio = f"{total_a / total_p:.2f}" if total_p > 0 else "n/a"
        rows.append(f"| all three | {total_p:.1f} min | {total_a:.1f} min | {ratio} | | | |")
    return rows


TARGET = {"seen": 0.90, "heldout": 0.60}  # all attributes right, CLIP's pick


def _share(rep: dict[str, Any], pick: str, key: str = "all") -> str:
    """A share with its 95% interval where the evaluation recorded tasks, else the plain rate."""
    if "tasks" in rep:
        return fmt(rep["tasks"][pick][key])
    return f"{rep['attributes'][pick][key]:.1%}"


def _ceiling(rep: dict[str, Any], which: str) -> str:
    ceilings = rep.get("ceilings", {})
    if which in ceilings:
        return fmt(ceilings[which]["all"])
    old = rep.get(f"{which}_ceiling" if which == "dvae" else "reader_ceiling")
    return f"{old['all']:.1%}" if old else "n/a"


def _trained_on(what: dict[str, Any] | None) -> str | None:
    if not what:
        return None
    if what["folder"] == UNLABELLED:
        return f"{what['scenes']} unlabelled scenes of every pair ({UNLABELLED}/)"
    return f"the training split ({what['folder']}/), as the prior"


def zero_shot_section(ev: dict[str, Any], dvae_images: dict[str, Any] | None = None) -> list[str]:
    """The report's first section: how often every attribute of a caption is right in its samples,
    for captions of seen pairs and of held-out pairs, with 95% intervals, beside the reader's and the
    dVAE's ceilings; then GenEval's task breakdown and what CLIP's pick adds per task. ``dvae_images``:
    what the dVAE trained on (the dVAE stage's ``trained_on``), said where it was not the training split."""
    held = "Held out: captions with a pair that never occurs in training."
    if dvae_images and dvae_images.get("folder") == UNLABELLED:
        held = (
            "Held out: captions with a pair that never occurs in a training caption: the BPE tokenizer, the "
            f"prior and CLIP never saw one. The dVAE trained on {dvae_images.get('scenes', '?')} unlabelled scenes "
            "of every pair, held-out ones included (images without captions, as an image tokenizer is trained on "
            "a broad image set)."
        )
    md = [
        "## Zero-shot: held-out colour-shape pairs",
        "",
        "Share of captions whose sample has count, shape, colour, size and place all as the caption says, "
        "with its 95% interval (Wilson). Seen: captions of the validation split, whose colour-shape pairs "
        f"occur in training. {held} Random pick: the first of the candidates; CLIP's pick: the small CLIP's "
        "best. Ceilings: the reader's pick (a candidate "
        "with every attribute right where one exists: what a perfect reranker would get from these candidates), "
        "the reader on the data's own renders, and on their reconstructions by the dVAE (what its tokens keep).",
        "",
        "| captions | random pick | CLIP's pick | all candidates | ceiling: reader's pick | ceiling: renders | "
        "ceiling: dVAE | target (CLIP's pick) | CLIP score (CLIP's pick) | FD in CLIP space |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, rep in ev["splits"].items():
        best = _share(rep, "reader_pick") if "reader_pick" in rep.get("tasks", {}) else "not recorded"
        md.append(
            f"| {split} ({rep['prompts']} x {rep['candidates']}) | {_share(rep, 'random_pick')} | "
            f"{_share(rep, 'reranked')} | {_share(rep, 'all_candidates')} | {best} | {_ceiling(rep, 'reader')} | "
            f"{_ceiling(rep, 'dvae')} | {TARGET.get(split, 0):.0%} | {rep['clip_score']['reranked']:.3f} | "
            f"{rep['fd_clip']:.3g} |"
        )
    keys = [k for k in next(iter(ev["splits"].values()))["attributes"]["reranked"] if k not in ("n", "all")]
    md += ["", "Per attribute (CLIP's pick / random pick):", "", "| captions | " + " | ".join(keys) + " |"]
    md.append("|---" * (len(keys) + 1) + "|")
    for split, rep in ev["splits"].items():
        r, f = rep["attributes"]["reranked"], rep["attributes"]["random_pick"]
        md.append(f"| {split} | " + " | ".join(f"{r[k]:.0%} / {f[k]:.0%}" for k in keys) + " |")
    md += _task_table(ev)
    md += _dvae_usage(ev)
    fids = {split: rep["fid_by_blur"] for split, rep in ev["splits"].items() if "fid_by_blur" in rep}
    if fids:
        radii = sorted(next(iter(fids.values())), key=float)
        md += ["", "FID of all samples against the renders, both blurred (Gaussian, radius in pixels):", ""]
        md += ["| captions | " + " | ".join(f"radius {r}" for r in radii) + " |", "|---" * (len(radii) + 1) + "|"]
        md += [f"| {split} | " + " | ".join(f"{f[r]:.3g}" for r in radii) + " |" for split, f in fids.items()]
    else:
        md += [
            "",
            "FID: not computed. It needs FID's Inception weights from a local file (evaluation.inception=PATH; "
            "nothing is downloaded); the Fréchet distance above is in the small CLIP's image space instead.",
        ]
    if ev.get("command"):
        md += ["", f"Reproduce these numbers: `{ev['command']}`"]
    return [*md, ""]


def _task_table(ev: dict[str, Any]) -> list[str]:
    """GenEval's tasks, CLIP's pick with its interval, and what the pick adds over a random one."""
    splits = {k: v for k, v in ev["splits"].items() if "tasks" in v}
    if not splits:
        return []
    md = [
        "",
        "By task, as GenEval scores it (each sample right only when every constraint of its task holds; "
        "overall: the mean of the tasks). CLIP's pick, with its 95% interval, and in brackets what it adds "
        "over a random pick, in points:",
        "",
        "| task | " + " | ".join(splits) + " |",
        "|---" * (len(splits) + 1) + "|",
    ]
    for task in (*TASKS, "overall"):
        cells = []
        for rep in splits.values():
            if task == "overall":
                cells.append(
                    f"{rep['tasks']['reranked']['overall']:.2f} (random {rep['tasks']['random_pick']['overall']:.2f})"
                )
                continue
            t = rep["tasks"]["reranked"][task]
            g = rep.get("clip_gain", {}).get(task)
            cells.append(fmt(t) + (f" ({g * 100:+.1f})" if g is not None else ""))
        md.append(f"| {task.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for failure in FAILURES:  # older evaluations lack it
        if all(failure in rep["tasks"]["reranked"] for rep in splits.values()):
            cells = [fmt(rep["tasks"]["reranked"][failure]) for rep in splits.values()]
            md.append(f"| a failure: {failure.replace('_', ' ')} (lower is better) | " + " | ".join(cells) + " |")
    return md


def _dvae_usage(ev: dict[str, Any]) -> list[str]:
    rows = [(k, v["ceilings"]["dvae"]) for k, v in ev["splits"].items() if "dvae" in v.get("ceilings", {})]
    if not rows:
        return []
    md = [
        "",
        "The dVAE on the evaluated renders: every attribute kept by its reconstructions, PSNR and codebook use:",
        "",
    ]
    md += ["| captions | all kept | shape kept | PSNR | codes used | perplexity |", "|---|---|---|---|---|---|"]
    for split, d in rows:
        md.append(
            f"| {split} | {fmt(d['all'])} | {fmt(d['shape'])} | {d['psnr']:.1f} dB | "
            f"{d['codes_used']} / {d['codebook_size']} | {d['perplexity']:.0f} |"
        )
    return md


def _pair(d: dict[str, Any], a: str, b: str) -> str | None:
    return f"{d[a]:.1%} / {d[b]:.1%}" if a in d and b in d else None


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _inlinable(path: Path, base: Path) -> bool:
    """Whether report.html may embed ``path``: a PNG file inside the output folder. The paths come
    from the stage markers, files in that folder which may come from someone else: any other file
    they named was read into the page."""
    try:
        real = path.resolve()
        if not real.is_relative_to(base.resolve()) or not real.is_file():
            return False
        with open(real, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _html(md: list[str], images: list[tuple[str, Path]], base: Path) -> str:
    """The same content as HTML, each picture (a PNG inside ``base``) embedded as a data URI; a
    picture that is missing, not a PNG or outside ``base`` is named instead."""
    inline = {_img_md(p, base): p for _, p in images}
    body, in_code, table = [], False, []
    for line in md:
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            body.append(html.escape(line))
        elif line in inline and _inlinable(inline[line], base):
            data = base64.b64encode(inline[line].read_bytes()).decode()
            body.append(f'<p><img src="data:image/png;base64,{data}" style="image-rendering:pixelated"></p>')
        elif line in inline:
            body.append(
                f"<p>(picture not shown: {html.escape(str(inline[line]))} is missing, not a PNG or outside "
                "the report's folder)</p>"
            )
        elif line.startswith("|"):
            if not set(line) <= set("|-"):
                cells = [html.escape(_unescape_md(c.strip())) for c in line.strip("|").split("|")]
                table.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(_unescape_md(line.lstrip('# ')))}</h{level}>")
        elif line:
            body.append(f"<p>{html.escape(_unescape_md(line))}</p>")
        if table and not line.startswith("|"):
            body.insert(len(body) - 1, "<table border=1 cellpadding=4>" + "".join(table) + "</table>")
            table = []
    return "<!doctype html><meta charset=utf-8><title>dalle-repro demo</title>\n" + "\n".join(body) + "\n"


def load_stage_settings(out_dir: str | Path) -> dict[str, Any]:
    cfg = Path(out_dir) / "config.yaml"
    return load_yaml(cfg) if cfg.is_file() else {}
