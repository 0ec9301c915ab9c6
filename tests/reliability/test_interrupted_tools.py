"""SIGKILL during the data tools, then a rerun: it completes, no half-written shard sits under a final
name, and the key sets equal a clean run's, with no sample lost or duplicated.

Each tool is killed at chosen points (``dalle_repro.core.faults``: a shard renamed into place whose
progress record was not yet written) and once at an unplanned moment (a real ``kill -9`` while it
writes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from helpers import ROOT, launch_env, png_bytes

from dalle_repro.data.tar import Shard, iter_shard_samples


def make_source(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img_{i:03d}.png").write_bytes(png_bytes((96, 80), seed=i))
        (root / f"img_{i:03d}.txt").write_text(f"picture {i}")
    return root


def keys(folder: Path) -> Counter:
    return Counter(k for k, _ in iter_shard_samples(sorted(str(p) for p in folder.rglob("*.tar"))))


def assert_whole(folder: Path) -> None:
    """Every tar under a final name reads to its end (a partial one would be truncated)."""
    for p in folder.rglob("*.tar"):
        assert not Shard(str(p)).truncated, p


def run(cmd: list[str], kill: str | None = None) -> subprocess.CompletedProcess:
    env = launch_env(**({"DALLE_REPRO_KILL": kill} if kill else {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def kill_while_writing(cmd: list[str], out: Path, shards_before_kill: int) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=launch_env())
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*.tar"))) < shards_before_kill and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_and_rerun(ledger, kind: str, tool: list[str], tmp_path: Path, kills: tuple[str, str]) -> tuple[Path, Path]:
    """A clean run, then a run into another folder killed at both points and once at random, then a
    rerun to the end. Checks every tar is whole after each kill and that the key sets match, each key
    once; returns (out, clean)."""
    clean = tmp_path / "clean"
    assert run([*tool, "--output", str(clean)]).returncode == 0
    out = tmp_path / "out"
    cmd = [*tool, "--output", str(out)]
    for kill in kills:
        r = run(cmd, kill)
        ledger.injected(kind)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert_whole(out)
    kill_while_writing(cmd, out, 9)
    ledger.injected(kind)
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    assert_whole(out)
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = keys(out), keys(clean)
    assert got == want and max(got.values()) == 1
    ledger.survived(kind, len(kills) + 1)
    ledger.lost(kind, sum((want - got).values()))
    return out, clean


def test_make_shards_killed_three_times_loses_and_duplicates_nothing(tmp_path, ledger):
    src = make_source(tmp_path / "src", 120)
    tool = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--input", str(src), "--shard-size", "8"]
    tool += ["--image-size", "32", "--val-fraction", "0.2"]
    kills = ("shard_written:00001.tar", "shard_written:00006.tar")
    out, clean = kill_and_rerun(ledger, "kill -9: make_shards", tool, tmp_path, kills)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert set(keys(clean)) == {f"img_{i:03d}" for i in range(120)}


def test_encode_tokens_killed_three_times_loses_and_duplicates_nothing(emoji_dir, prior_data, tmp_path, ledger):
    shards = f"{emoji_dir}/*/*.tar"
    tool = [sys.executable, str(ROOT / "tools" / "encode_tokens.py"), "--dvae", str(prior_data["dvae"])]
    tool += ["--shards", shards, "--batch-size", "4"]
    kills = ("shard_written:00001.tar", "shard_written:00005.tar")
    out, clean = kill_and_rerun(ledger, "kill -9: encode_tokens", tool, tmp_path, kills)
    assert sum(keys(clean).values()) == 96
    for p in clean.rglob("*.tar"):  # the same tokens, byte for byte
        assert (out / p.relative_to(clean)).read_bytes() == p.read_bytes(), p
