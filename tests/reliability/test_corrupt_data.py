"""Corrupt data through the whole pipeline: sharding, loading, dVAE training, pre-encoding and prior
training all go on through every kind of bad input, count it by reason in their summaries and logs,
and lose no good sample.

The source folder holds good images plus a zero-byte file, a text file named .jpg, an image bomb,
a truncated PNG, every odd PIL mode that a file can carry, and captions that are empty, 100k
characters, full of control characters or not UTF-8. The shards made from it then get a truncated
tar, an unreadable tar, and members that are not images, are empty, are bombs or are not UTF-8,
written straight into the tars (as a broken downloader would).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, bomb_png, dvae_overrides, odd_mode_image, png_bytes, prior_overrides

from dalle_repro.core.config import load_config
from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.data.pre_encode import encode_token_shards
from dalle_repro.data.sources import expand_shards
from dalle_repro.data.tar import Shard
from dalle_repro.train.dvae import DVAETrainConfig
from dalle_repro.train.dvae import train as train_dvae
from dalle_repro.train.metrics import read_metrics
from dalle_repro.train.prior import train as train_prior
from dalle_repro.train.prior_config import PriorTrainConfig

GOOD = 40
MODES = {  # mode -> file format that can carry it
    "1": "PNG",
    "L": "PNG",
    "LA": "PNG",
    "P": "PNG",
    "PA": "TIFF",
    "RGBA": "PNG",
    "RGBX": "TIFF",
    "I;16": "PNG",
    "I": "TIFF",
    "F": "TIFF",
    "CMYK": "JPEG",
    "YCbCr": "JPEG",
    "LAB": "TIFF",
}


def odd_mode_bytes(mode: str, fmt: str, seed: int) -> bytes:
    im = odd_mode_image(mode, 20, 24, seed)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def make_source(root: Path) -> dict[str, set[str] | Counter]:
    """The source folder; returns the keys that must come through and the expected skip counts."""
    root.mkdir(parents=True)
    keep: set[str] = set()
    for i in range(GOOD):
        (root / f"good_{i:03d}.png").write_bytes(png_bytes(seed=i))
        (root / f"good_{i:03d}.txt").write_text(f"a good picture number {i}")
        keep.add(f"good_{i:03d}")
    for i, (mode, fmt) in enumerate(MODES.items()):
        stem = f"mode_{i:02d}"
        ext = {"PNG": "png", "TIFF": "tif", "JPEG": "jpg"}[fmt]
        (root / f"{stem}.{ext}").write_bytes(odd_mode_bytes(mode, fmt, 100 + i))
        (root / f"{stem}.txt").write_text(f"an image in mode {mode}")
        keep.add(stem)
    captions = {
        "cap_long": ("x" * 100_000).encode(),
        "cap_control": b"a\x00 cat\x1b[31m in\r\n red\x07\x7f",
        "cap_utf8": b"caf\xc3\xa9 \xff\xfe broken \x80 bytes",
    }
    for j, (stem, raw) in enumerate(captions.items()):
        (root / f"{stem}.png").write_bytes(png_bytes(seed=200 + j))
        (root / f"{stem}.txt").write_bytes(raw)
        keep.add(stem)
    bad = {
        "bad_zero.png": b"",
        "bad_text.jpg": b"plain text pretending to be a JPEG",
        "bad_bomb.png": bomb_png(),
        "bad_trunc.png": png_bytes((40, 40), seed=3)[:-60],
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text("a caption")
    (root / "bad_empty_caption.png").write_bytes(png_bytes(seed=300))
    (root / "bad_empty_caption.txt").write_text("")
    skipped = Counter(empty_file=1, not_an_image=1, image_bomb=1, corrupt_image=1, empty_caption=1)
    return {"keep": keep, "skipped": skipped}


def add_member(tar_path: Path, name: str, data: bytes) -> None:
    with tarfile.open(tar_path, "a") as t:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corrupt")
    expected = make_source(root / "src")
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--input", str(root / "src")]
    cmd += ["--output", str(root / "shards"), "--shard-size", "8", "--image-size", "16", "--format", "png"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((root / "shards" / "summary.json").read_text())
    shards = sorted((root / "shards").glob("*.tar"))
    # Faults in the shards themselves (what a broken download or a full disk leaves).
    add_member(shards[0], "zz_text.png", b"not an image")
    add_member(shards[0], "zz_text.txt", b"cap")
    add_member(shards[0], "zz_zero.png", b"")
    add_member(shards[0], "zz_zero.txt", b"cap")
    add_member(shards[1], "zz_bomb.png", bomb_png())
    add_member(shards[1], "zz_bomb.txt", b"cap")
    add_member(shards[1], "zz_badutf8.png", png_bytes((16, 16), seed=7))
    add_member(shards[1], "zz_badutf8.txt", b"\xff\xfe\x80 not utf-8 \x00")
    (root / "shards" / "99999.tar").write_bytes(b"\0garbage" * 64)  # unreadable
    last = shards[-1]
    intact_before = {k for k, _ in Shard(str(last)).samples}
    data = last.read_bytes()
    last.write_bytes(data[: int(len(data) * 0.6)])  # truncated mid-sample
    survivors = {k for k, _ in Shard(str(last)).samples}
    keep = set(expected["keep"]) | {"zz_badutf8"}
    lost_to_truncation = intact_before - survivors  # gone with the bytes: not ours to deliver
    return {
        "root": root,
        "summary": summary,
        "expected": expected,
        "keep": keep - lost_to_truncation,
        "truncated_away": lost_to_truncation,
        "shards": str(root / "shards" / "*.tar"),
    }


def test_sharding_skips_and_counts_every_bad_source_file(corrupt, ledger):
    s, expected = corrupt["summary"], corrupt["expected"]
    ledger.injected("corrupt data: sharding", sum(expected["skipped"].values()) + len(MODES) + 3)
    assert s["skipped"] == dict(expected["skipped"]), s["skipped"]
    assert s["written"] == len(expected["keep"])
    ledger.survived("corrupt data: sharding", sum(expected["skipped"].values()) + len(MODES) + 3)
    ledger.lost("corrupt data: sharding", len(expected["keep"]) - s["written"])


def test_loading_delivers_every_good_sample_once_and_counts_the_rest(corrupt, ledger):
    loader = Loader(expand_shards(corrupt["shards"]), DataArgs(image_size=16, batch_size=4, shuffle=False), epochs=1)
    keys, captions = [], []
    for batch in loader:
        keys += batch["key"]
        captions += batch["caption"]
        assert batch["image"].shape[1:] == (3, 16, 16)
    assert len(keys) == len(set(keys)), "a sample came twice"
    assert set(keys) == corrupt["keep"], set(keys) ^ corrupt["keep"]
    e = loader.errors
    assert e["not_an_image"] == 1 and e["empty_file"] == 1 and e["image_bomb"] == 1
    assert e["truncated_shard"] == 1 and e["unreadable_shard"] == 1
    assert all(len(c) <= 4096 and c.isprintable() for c in captions)
    assert "\ufffd" in captions[keys.index("zz_badutf8")]  # decoded with replacement, not dropped
    ledger.injected("corrupt data: loading", 7)
    ledger.survived("corrupt data: loading", 7)
    ledger.lost("corrupt data: loading", len(corrupt["keep"] - set(keys)))


def test_dvae_training_runs_through_the_bad_shards_and_logs_the_counts(corrupt, tmp_path, ledger):
    shards = corrupt["shards"]
    over = dvae_overrides(Path("unused"), tmp_path / "dvae", "run.steps=10", "run.ckpt_every=10", "run.val_every=10")
    over += [f"data.shards={shards}", f"run.val_shards={shards}"]
    train_dvae(load_config(DVAETrainConfig, None, over))
    rows = [r for r in read_metrics(tmp_path / "dvae") if "loss" in r]
    assert len(rows) == 10 and all(np.isfinite(r["loss"]) for r in rows)
    last = rows[-1]  # 10 steps x 8 samples > one pass over the data: every bad sample was met
    assert last["data_not_an_image"] >= 1 and last["data_image_bomb"] >= 1 and last["data_empty_file"] >= 1
    assert last["data_truncated_shard"] >= 1 and last["data_unreadable_shard"] >= 1
    assert (tmp_path / "dvae" / "dvae" / "model.safetensors").is_file()
    ledger.injected("corrupt data: dVAE training", 5)
    ledger.survived("corrupt data: dVAE training", 5)
    ledger.lost("corrupt data: dVAE training", 0)


def test_pre_encoding_and_prior_training_run_through_the_bad_data(corrupt, prior_data, tmp_path, ledger):
    out = tmp_path / "tokens"
    s = encode_token_shards(prior_data["dvae"], expand_shards(corrupt["shards"]), out)
    assert s["written"] == len(corrupt["keep"])
    skipped = s["skipped"]
    assert skipped["not_an_image"] == 1 and skipped["empty_file"] == 1 and skipped["image_bomb"] == 1
    assert skipped["truncated_shard"] == 1 and skipped["unreadable_shard"] == 1
    token_shards = sorted(out.glob("*.tar"))
    add_member(token_shards[0], "zz_junk.tokens", b"\x93NUMPY garbage")  # a corrupt token grid
    add_member(token_shards[0], "zz_junk.txt", b"cap")
    add_member(token_shards[0], "zz_float.tokens", _npy(np.full((4, 4), 0.5, dtype=np.float32)))
    add_member(token_shards[0], "zz_float.txt", b"cap")
    add_member(token_shards[0], "zz_shape.tokens", _npy(np.zeros((3, 3), dtype=np.uint16)))  # another dVAE's grid
    add_member(token_shards[0], "zz_shape.txt", b"cap")
    add_member(token_shards[0], "zz_range.tokens", _npy(np.full((4, 4), 999, dtype=np.uint16)))  # ids >= vocab 32
    add_member(token_shards[0], "zz_range.txt", b"cap")
    pattern = f"{out}/*.tar"
    over = prior_overrides(prior_data, tmp_path / "prior", "run.steps=20", "data.num_workers=0")
    over += [f"data.shards={pattern}", f"run.val_shards={pattern}"]
    result = train_prior(load_config(PriorTrainConfig, None, over))
    assert result["step"] == 20 and np.isfinite(result["val_loss"])
    last = [r for r in read_metrics(tmp_path / "prior") if "loss" in r][-1]  # 20 x 4 samples > one pass
    assert last["data_corrupt_tokens"] >= 3 and last["data_wrong_token_grid"] >= 1, last
    ledger.injected("corrupt data: pre-encoding + prior", 9)
    ledger.survived("corrupt data: pre-encoding + prior", 9)
    ledger.lost("corrupt data: pre-encoding + prior", len(corrupt["keep"]) - s["written"])


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_deeply_nested_json_metadata_does_not_end_pre_encoding(prior_data, tmp_path):
    """json.loads raises RecursionError, not ValueError, on a deeply nested document: it used to end the job."""
    shard = tmp_path / "nested.tar"
    with tarfile.open(shard, "w") as t:
        for key, meta in (("a_nested", b"[" * 200_000 + b"]" * 200_000), ("b_plain", b'{"w": 24}')):
            for ext, data in (("png", png_bytes()), ("txt", b"a caption"), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    s = encode_token_shards(prior_data["dvae"], [str(shard)], tmp_path / "tokens")
    assert s["written"] == 2


def test_keys_that_name_paths_outside_the_folder_are_not_copied_into_token_shards(prior_data, tmp_path):
    """'../../x' and '/abs/x' went into pre_encode's tars as they were: other tools would extract them outside."""
    shard = tmp_path / "keys.tar"
    with tarfile.open(shard, "w") as t:
        for key in ("../../evil", "/abs/x", "part1/000017"):
            for ext, data in (("png", png_bytes()), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    s = encode_token_shards(prior_data["dvae"], [str(shard)], tmp_path / "tokens")
    assert s["written"] == 3 and s["skipped"].get("unsafe_key_renamed") == 2
    names = [n for p in (tmp_path / "tokens").glob("**/*.tar") for n in tarfile.open(p).getnames()]
    assert names and not any(n.startswith(("/", "..")) or "/../" in n for n in names)
    assert "part1/000017.tokens" in names  # a plain folder key is kept as it is


def test_the_shard_writer_refuses_an_unsafe_key(tmp_path):
    from dalle_repro.data.writer import Sample, write_tar

    with pytest.raises(ValueError, match="unsafe sample key"):
        write_tar(tmp_path / "x.tar", [Sample("../x", b"", "tokens", "c", {})])
    assert not list(tmp_path.iterdir())


def test_token_shards_of_another_dvae_are_not_overwritten_silently(prior_data, emoji_dir, tmp_path):
    """encode_tokens into a folder made with another dVAE overwrote every shard; make_shards would have refused."""
    import torch

    from dalle_repro.models.dvae import DVAE, DVAEArgs

    shards = sorted(str(p) for p in (emoji_dir / "train").glob("*.tar"))[:2]
    out = tmp_path / "tokens"
    encode_token_shards(prior_data["dvae"], shards, out)
    before = {p: p.read_bytes() for p in out.glob("**/*.tar")}
    encode_token_shards(prior_data["dvae"], shards, out)  # the same dVAE again: a no-op, as before
    torch.manual_seed(1)
    other = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8))
    other.save_pretrained(tmp_path / "other_dvae")
    with pytest.raises(FileExistsError, match="another dVAE"):
        encode_token_shards(tmp_path / "other_dvae", shards, out)
    assert {p: p.read_bytes() for p in out.glob("**/*.tar")} == before
    s = encode_token_shards(tmp_path / "other_dvae", shards, out, overwrite=True)
    assert s["dvae"] == str(tmp_path / "other_dvae") and {p: p.read_bytes() for p in out.glob("**/*.tar")} != before
