"""Benchmarks, measured side by side in one run (A B A B), reported as one JSON line each.

Usage: python bench/run.py WORKLOAD [--threads 2] [--rounds 3]

Workloads available now:
  loader  images/s of our resumable Loader (random access into shards, exact-resume bookkeeping)
          against a plain webdataset pipeline doing the same decode + center crop on the same
          shards, single process. Reports both rates and their ratio.

The workloads of shared/BENCH.md (vae_train, prior_train, sample) join as the dVAE, the
transformer and the sampler land.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from dalle_repro.data import DataArgs, Loader, crop_resize, decode_image, expand_shards, image_to_tensor


def _shards(tmp: Path) -> list[str]:
    demo = Path("data/emoji/train")
    if demo.is_dir() and list(demo.glob("*.tar")):
        return sorted(str(p) for p in demo.glob("*.tar"))
    from dalle_repro.emoji import build_emoji_dataset

    build_emoji_dataset(tmp, image_size=64, shard_size=256, val_fraction=0.05)
    return sorted(str(p) for p in (tmp / "train").glob("*.tar"))


def _ours(paths: list[str], size: int, shuffle: bool) -> int:
    args = DataArgs(image_size=size, batch_size=32, num_workers=0, shuffle=shuffle)
    return sum(len(b["key"]) for b in Loader(paths, args, epochs=1))


def _webdataset(paths: list[str], size: int) -> int:
    def prep(sample: dict) -> torch.Tensor:
        data = sample.get("png") or sample.get("jpg")
        im, _ = decode_image(data)
        return image_to_tensor(crop_resize(im, size))

    ds = wds.WebDataset(paths, shardshuffle=False, empty_check=False).map(prep)
    return sum(1 for _ in ds)


def bench_loader(rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = expand_shards(_shards(Path(tmp)))
        runs = {
            "ours_seq": lambda: _ours(paths, 64, False),
            "ours_shuffled": lambda: _ours(paths, 64, True),
            "webdataset": lambda: _webdataset(paths, 64),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        counts: dict[str, int] = {}
        for fn in runs.values():  # warm the page cache and imports
            fn()
        for _ in range(rounds):  # alternate, so drift hits every side alike
            for name, fn in runs.items():
                t = time.perf_counter()
                counts[name] = fn()
                times[name].append(time.perf_counter() - t)
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the pipelines read different sample counts: {counts}")
    rate = {k: counts[k] / min(v) for k, v in times.items()}
    return {
        "loader_img_per_s": round(rate["ours_shuffled"], 1),
        "loader_seq_img_per_s": round(rate["ours_seq"], 1),
        "webdataset_img_per_s": round(rate["webdataset"], 1),
        "ratio_vs_webdataset": round(rate["ours_shuffled"] / rate["webdataset"], 3),
        "samples": counts["webdataset"],
    }


WORKLOADS = {"loader": bench_loader}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=[*WORKLOADS, "all"])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each side counts")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for name in WORKLOADS if a.workload == "all" else [a.workload]:
        print(json.dumps({"workload": name, "threads": a.threads} | WORKLOADS[name](a.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
