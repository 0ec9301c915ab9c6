"""Where a demo dVAE's code entropy goes, background against ink, beside what its prior learnt.

The prior models every image token, so a dVAE that spends codes on what no caption says (the strokes
set's paper texture, pixel noise) gives it entropy to learn that buys no composition. For each
finished demo run (its ``out_dir``) this encodes the first ``--images`` training images of its data
with its dVAE (argmax codes, as the token shards hold them) and splits the grid's positions into
ink patches (a pixel further than ``--ink`` levels from the world's background colour) and
background patches. Per run: the share of ink patches; the perplexity of the codes over all
positions, background positions and ink positions; the codes each kind uses; the distinct codes of
an image's background (on a flat background, a handful; on texture, one per patch); and the share of
the grid's code entropy spent on background. Beside them, what the run's prior reached (its final
validation image loss) and its evaluation (CLIP's pick all right, two objects all right, shapes
swapped, seen and held out), where the run has them.

The data is found through the run's ``config.yaml``: its ``dataset`` names the world and
``<dataset>.output`` the shards, relative to the folder the demo ran in (``out_dir`` stripped from
the run folder, or ``--root``).

Usage: python bench/code_entropy.py RUN_OUT [RUN_OUT ...] [--images 1000] [--ink 60] [--out F.json]
Prints a Markdown table and the JSON; writes the JSON to --out when given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ink_patches(images: np.ndarray, background: tuple[int, int, int], grid: int, ink: float) -> np.ndarray:
    """(N, grid, grid) bool: the patches of (N, H, W, 3) images holding a pixel further than ``ink``
    levels (Euclidean, RGB) from ``background``."""
    n, h, w, _ = images.shape
    if h % grid or w % grid:
        raise ValueError(f"images of {h}x{w} pixels do not split into a {grid}x{grid} grid")
    far = np.linalg.norm(images.astype(np.float32) - np.asarray(background, np.float32), axis=-1) > ink
    return far.reshape(n, grid, h // grid, grid, w // grid).any(axis=(2, 4))


def _usage(codes: np.ndarray, vocab: int) -> dict[str, float]:
    """models.dvae.codebook_usage of some codes, with their entropy in nats (0 where none)."""
    import torch

    from dalle_repro.models.dvae import codebook_usage

    usage = codebook_usage(torch.bincount(torch.from_numpy(codes.ravel()), minlength=vocab))
    return usage | {"entropy": math.log(usage["perplexity"]) if usage["perplexity"] > 0 else 0.0}


def code_stats(tokens: np.ndarray, ink: np.ndarray, vocab: int) -> dict[str, Any]:
    """Perplexities and code counts of (N, g, g) ``tokens`` over all, background and ink positions."""
    if tokens.shape != ink.shape:
        raise ValueError(f"tokens {tokens.shape} and ink mask {ink.shape} differ")
    every, bg, fg = _usage(tokens, vocab), _usage(tokens[~ink], vocab), _usage(tokens[ink], vocab)
    spent_bg, spent_fg = bg["entropy"] * (~ink).mean(), fg["entropy"] * ink.mean()
    per_image = [len(np.unique(t[~m])) for t, m in zip(tokens, ink, strict=True) if (~m).any()]
    return {
        "images": int(len(tokens)),
        "ink_share": round(float(ink.mean()), 4),
        "perplexity": round(every["perplexity"], 1),
        "perplexity_background": round(bg["perplexity"], 1),
        "perplexity_ink": round(fg["perplexity"], 1),
        "codes_used": every["codes_used"],
        "codes_used_background": bg["codes_used"],
        "codes_used_ink": fg["codes_used"],
        "background_codes_per_image": round(float(np.mean(per_image)), 1) if per_image else None,
        "background_positions_per_image": round(float((~ink).sum() / len(tokens)), 1),
        "background_share_of_entropy": round(spent_bg / (spent_bg + spent_fg), 3) if spent_bg + spent_fg else None,
    }


def demo_root(out: Path, out_dir: str, root: Path | None) -> Path:
    """The folder the demo ran in: ``root`` when given, else ``out`` with ``out_dir`` stripped."""
    if root is not None:
        return root
    rel = Path(out_dir)
    if rel.is_absolute() or out.resolve().parts[-len(rel.parts) :] != rel.parts:
        raise SystemExit(f"{out} does not end with its config's out_dir {out_dir!r}: give --root (where the demo ran)")
    return out.resolve().parents[len(rel.parts) - 1]


def load_images(shards: list[str], count: int) -> np.ndarray:
    """(count, H, W, 3) uint8: the first ``count`` decodable images of ``shards``, in order, decoded as
    the loader decodes them (samples.decode_image: RGB, the pixel bound)."""
    from dalle_repro.data.samples import IMAGE_EXTS, SampleError, decode_image
    from dalle_repro.data.tar import iter_shard_samples

    images = []
    for _, members in iter_shard_samples(shards):
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            continue
        try:
            im, _ = decode_image(members[ext])
        except SampleError:
            continue
        images.append(np.asarray(im, dtype=np.uint8))
        if len(images) == count:
            break
    if not images:
        raise SystemExit(f"no image in {len(shards)} shards: {shards[:3]}")
    return np.stack(images)


def run_stats(out: Path, count: int, ink: float, root: Path | None = None) -> dict[str, Any]:
    """Everything the table shows of one demo run folder."""
    import glob

    import torch
    import yaml

    from dalle_repro.data.worlds import world_of
    from dalle_repro.models.dvae import DVAE

    cfg_path = out / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"{out} holds no config.yaml: give a demo run's out_dir")
    cfg = yaml.safe_load(cfg_path.read_text())
    dataset = cfg.get("dataset")
    world = world_of(dataset)
    data = Path(cfg[dataset]["output"])
    if not data.is_absolute():  # relative to the folder the demo ran in
        data = demo_root(out, cfg["out_dir"], root) / data
    shards = sorted(glob.glob(str(data / "train" / "*.tar")))
    if not shards:
        raise SystemExit(f"no training shards in {data / 'train'} (the {dataset} data of {out})")
    model = DVAE.from_pretrained(out / "dvae" / "dvae").eval()
    images = load_images(shards, count)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        tokens = torch.cat([model.encode(b) for b in x.split(250)]).numpy()
    row: dict[str, Any] = {"run": str(out), "world": dataset}
    row |= code_stats(tokens, ink_patches(images, world.BACKGROUND, tokens.shape[-1], ink), model.args.vocab_size)
    row["codebook"] = model.args.vocab_size
    prior = out / "prior" / "final_metrics.json"
    if prior.is_file():
        metrics = json.loads(prior.read_text())
        row["prior_val_image_loss"] = round(metrics["val_image_loss"], 3)
        row["prior_steps"] = metrics.get("step")
    evaluation = out / "evaluation" / "evaluation.json"
    if evaluation.is_file():
        for split, rep in json.loads(evaluation.read_text())["splits"].items():
            tasks = rep["tasks"]["reranked"]
            row[split] = {
                key: round(tasks[key]["rate"], 4) for key in ("all", "two_objects", "shapes_swapped") if key in tasks
            }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | ink patches | perplexity: all / background / ink | background codes per image (of positions) "
        "| background's share of entropy | prior val image loss | CLIP's pick all right: seen / held out "
        "| two objects: seen / held out |"
    )
    lines = [head, "|" + "---|" * 8]

    def pct(row: dict[str, Any], key: str) -> str:
        return " / ".join(f"{100 * row[s][key]:.1f}%" if key in row.get(s, {}) else "-" for s in ("seen", "heldout"))

    for r in rows:
        lines.append(
            f"| {r['run']} | {100 * r['ink_share']:.1f}% | {r['perplexity']} / {r['perplexity_background']} / "
            f"{r['perplexity_ink']} | {r['background_codes_per_image']} ({r['background_positions_per_image']}) | "
            f"{100 * r['background_share_of_entropy']:.0f}% | {r.get('prior_val_image_loss', '-')} | "
            f"{pct(r, 'all')} | {pct(r, 'two_objects')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished demo runs' out_dir folders")
    p.add_argument("--images", type=int, default=1000, help="training images encoded per run (default 1000)")
    p.add_argument("--ink", type=float, default=60.0, help="RGB distance from the background that counts as ink")
    p.add_argument("--root", type=Path, help="the folder the demo ran in (default: the run folder less out_dir)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: light beside other work)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.images < 1:
        p.error(f"--images must be at least 1, got {a.images}")
    import torch

    from dalle_repro.core.cpuinfo import cpu_record
    from dalle_repro.core.files import atomic_write_text

    torch.set_num_threads(a.threads)
    rows = [run_stats(out, a.images, a.ink, a.root) for out in a.runs]
    result = {"runs": rows, "images": a.images, "ink": a.ink, "machine": cpu_record()}
    print(table(rows))
    print(json.dumps(result))
    if a.out:
        atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
