"""Helpers shared by the test modules (tests/ is on sys.path through tests/conftest.py).

Tiny configurations of both trainers as command-line overrides, so that the same settings serve
in-process runs and runs started as processes, and the way the tests start the deepspeed launcher.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from dalle_repro.data.emoji import EMOJI_TEST_PATH, FONT_PATH

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def dvae_overrides(emoji_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A dVAE of 16x16 images -> 4x4 codes of 32 that trains a step in well under a second."""
    return [
        "model.image_size=16",
        "model.n_hid=8",
        "model.n_blk_per_group=1",
        "model.group_count=3",
        "model.vocab_size=32",
        "model.n_init=8",
        f"data.shards={emoji_dir}/train/*.tar",
        "data.batch_size=8",
        "data.num_workers=0",
        f"run.val_shards={emoji_dir}/val/*.tar",
        f"run.run_dir={run_dir}",
        "run.steps=6",
        "run.ckpt_every=3",
        "run.val_every=3",
        "run.val_batches=2",
        "run.grid_images=4",
        "log.every=1",
        "schedule.lr_start=0.003",
        "schedule.tau_steps=10",
        "schedule.beta_steps=4",
        "schedule.lr_steps=10",
        *extra,
    ]


def prior_overrides(data: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    """A 4-layer prior over 8 text tokens + 4x4 codes of 32 (the ``prior_data`` fixture's data); the
    vocabularies and grid are read off the tokenizer and the dVAE (train_prior.resolve_sizes)."""
    return [
        "model.dim=32",
        "model.depth=4",
        "model.heads=4",
        "model.conv_kernel=3",
        "precision.dtype=bf16",
        f"text.path={data['tokenizer']}",
        "text.text_len=8",
        f"dvae={data['dvae']}",
        f"data.shards={data['tokens']}/train/*.tar",
        "data.kind=tokens",
        "data.batch_size=4",
        "data.num_workers=1",
        "schedule.lr=0.003",
        "schedule.warmup_steps=2",
        f"run.run_dir={run_dir}",
        "run.steps=6",
        "run.ckpt_every=100",
        "run.val_every=100",
        "run.sample_every=100",
        f"run.val_shards={data['tokens']}/val/*.tar",
        "run.val_batches=2",
        "run.sample_captions=2",
        "run.caption_dropout=0.3",
        "log.every=1",
        *extra,
    ]


def clip_overrides(data_dir: Path, tokenizer: Path, run_dir: Path, *extra: str, text_len: int = 12) -> list[str]:
    """A small CLIP of 16x16 images (one layer per tower) on ``data_dir``'s train/ and val/ shards, 4 steps."""
    return [
        "model.image_size=16",
        "model.patch_size=8",
        "model.width=32",
        "model.layers=1",
        "model.heads=2",
        "model.embed_dim=16",
        f"model.text_len={text_len}",
        f"text.path={tokenizer}",
        f"data.shards={data_dir}/train/*.tar",
        f"run.val_shards={data_dir}/val/*.tar",
        "data.batch_size=8",
        "data.num_workers=0",
        f"run.run_dir={run_dir}",
        "run.steps=4",
        "log.every=1",
        *extra,
    ]


def launcher() -> str:
    """The deepspeed launcher beside this Python (skips the test when it is not installed)."""
    path = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(path).exists():
        pytest.skip("the deepspeed launcher is not installed")
    return path


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without a parent launcher's rank variables, on CPU, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return env | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} | extra


def train_prior_on_two_ranks(config: Path) -> None:
    """launch/train_prior.py with ``--config config`` under the deepspeed launcher, 2 CPU ranks on a
    free port; fails the test with the output's end when it does not exit 0."""
    from dalle_repro.core.distributed import free_port

    cmd = [launcher(), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train_prior.py")]
    cmd += ["--config", str(config)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def checkpoint_state(run_dir: Path, step: int) -> dict:
    """The ``state.json`` of a prior run's checkpoint at ``step``."""
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())


def png_bytes(size: tuple[int, int] = (24, 20), mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    """A random image in the given mode, encoded."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("I;16",):
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (never decoded: rejected by size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def make_folder(root: Path, n: int, size: tuple[int, int] = (24, 20)) -> Path:
    """``n`` captioned images ``img_000.png`` + ``img_000.txt`` in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img_{i:03d}.png").write_bytes(png_bytes(size, seed=i))
        (root / f"img_{i:03d}.txt").write_text(f"a picture number {i}")
    return root


needs_emoji = pytest.mark.skipif(
    not (Path(FONT_PATH).is_file() and Path(EMOJI_TEST_PATH).is_file()),
    reason="needs Debian's fonts-noto-color-emoji and unicode-data (tools/setup.sh installs them)",
)


def odd_mode_image(mode: str, height: int, width: int, seed: int = 0) -> Image.Image:
    """A random image in PIL mode ``mode`` (16-bit and float ones made directly, P with a transparent index)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    if mode == "PA":
        return base.convert("P").convert("PA")
    im = base.convert(mode)
    if mode == "P":
        im.info["transparency"] = 0
    return im


def bench_script(name: str) -> ModuleType:
    """``bench/NAME.py`` loaded as the module ``NAME`` (registered in sys.modules, where its
    dataclasses look their module up); bench/ is scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
