"""SIGKILL at chosen points of both trainers, then ``--resume``: nothing but the work since the last
checkpoint is lost, and the final weights equal an uninterrupted run's bit for bit.

The kills come from ``dalle_repro.core.faults`` (``DALLE_REPRO_KILL``), so they land between two updates,
half-way through a checkpoint folder, after DeepSpeed's part of a checkpoint but before ours, and
half-way through the export. Each run of a chain is armed with one point; the chain resumes after
every kill. After each kill the suite checks that every checkpoint folder under a final name is
whole and loadable, and that ``--resume`` picks the newest whole one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, dvae_overrides, launch_env, launcher, prior_overrides
from safetensors.torch import load_file

from dalle_repro.core.config import load_config, save_config
from dalle_repro.core.distributed import free_port
from dalle_repro.train.checkpoint import Checkpoints
from dalle_repro.train.prior_config import PriorTrainConfig


def run(cmd: list[str], kill: str | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    extra = {"DALLE_REPRO_KILL": kill} if kill else {}
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=launch_env(**extra, **env)
    )


def check_checkpoints(run_dir: Path) -> int:
    """Every step_* folder is whole and loads; returns the step --resume would continue from."""
    ckpts = Checkpoints(run_dir)
    for path in ckpts.all():
        files, state = Checkpoints.load(path)  # raises on a partial folder
        assert state["step"] == int(path.name[5:]), path
        assert files, path
    latest = ckpts.latest()
    assert latest == (ckpts.all()[-1] if ckpts.all() else None)
    return 0 if latest is None else int(latest.name[5:])


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), a
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{a} vs {b}: {different[:5]}"


def positions(run_dir: Path, step: int) -> list:
    state = json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())
    return [r["loader"] for r in state["ranks"]]


def kill_chain(ledger, kind: str, cmd: list[str], resume: list[str], run_dir: Path, kills: list[str], **env) -> None:
    """Run ``cmd``, armed with each kill in turn (resuming after each), then once more to the end."""
    for i, kill in enumerate(kills):
        r = run(cmd if i == 0 else resume, kill=kill, **env)
        ledger.injected(kind)
        assert r.returncode == -signal.SIGKILL, f"{kill} did not kill: {r.returncode}\n{r.stderr[-2000:]}"
        before = check_checkpoints(run_dir)
        if kill.startswith("after_step:"):  # only the updates since the last checkpoint are lost
            assert before <= int(kill.split(":")[1])
        if kill.startswith("checkpoint_write:step_"):  # the partial folder never counts
            assert before < int(kill.split("_")[-1])
    r = run(resume, **env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ledger.survived(kind, len(kills))


# ----------------------------------------------------------------------------------------------
# dVAE


DVAE_KILLS = [
    "after_step:3",  # between two updates
    "checkpoint_write:step_00000006",  # files written, folder not yet renamed into place
    "after_step:8",  # again, after resuming past the stale half-written folder
    "checkpoint_write:step_00000012",  # the last checkpoint
    "checkpoint_write:dvae",  # the export
]


def test_dvae_killed_at_five_points_ends_with_the_uninterrupted_weights(emoji_dir, tmp_path, ledger):
    script = str(ROOT / "launch" / "train_dvae.py")
    opts = ["run.steps=12", "run.ckpt_every=2", "run.val_every=6", "run.keep=10"]
    ref = tmp_path / "ref"
    r = run([sys.executable, script, *dvae_overrides(emoji_dir, ref, *opts)])
    assert r.returncode == 0, r.stderr[-3000:]
    hit = tmp_path / "killed"
    cmd = [sys.executable, script, *dvae_overrides(emoji_dir, hit, *opts)]
    kill_chain(ledger, "kill -9: dVAE training", cmd, [*cmd, "--resume"], hit, DVAE_KILLS)
    assert not list((hit / "checkpoints").glob(".step_*")), "a stale half-written folder was left behind"
    for name in ("model", "raw"):
        assert_same_weights(ref / "dvae" / f"{name}.safetensors", hit / "dvae" / f"{name}.safetensors")
    assert positions(ref, 12) == positions(hit, 12)  # the same samples, each read once
    ledger.lost("kill -9: dVAE training", 0)
    metrics = json.loads((hit / "final_metrics.json").read_text())
    assert metrics["step"] == 12


# ----------------------------------------------------------------------------------------------
# Prior


def prior_config(prior_data, tmp_path: Path, run_dir: Path, *extra: str) -> Path:
    cfg = load_config(PriorTrainConfig, None, prior_overrides(prior_data, run_dir, *extra))
    return save_config(cfg, tmp_path, f"{run_dir.name}.yaml")


def test_prior_killed_in_one_process_ends_with_the_uninterrupted_weights(prior_data, tmp_path, ledger):
    """The quick case: one process (no launcher), three kills."""
    script = str(ROOT / "launch" / "train_prior.py")
    opts = ("run.steps=6", "run.ckpt_every=2", "run.keep=10", "data.num_workers=0")
    ref, hit = tmp_path / "ref", tmp_path / "killed"
    r = run([sys.executable, script, "--config", str(prior_config(prior_data, tmp_path, ref, *opts))])
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, script, "--config", str(prior_config(prior_data, tmp_path, hit, *opts))]
    kills = ["after_step:3", "deepspeed_saved:step_00000004", "checkpoint_write:step_00000006"]
    kill_chain(ledger, "kill -9: prior, 1 process", cmd, [*cmd, "--resume"], hit, kills)
    for name in ("model", "raw"):
        assert_same_weights(ref / "export" / f"{name}.safetensors", hit / "export" / f"{name}.safetensors")
    assert positions(ref, 6) == positions(hit, 6)
    ledger.lost("kill -9: prior, 1 process", 0)


PRIOR_LAUNCHER_KILLS = [
    ("after_step:3", None),  # every rank dies: a lost node
    ("after_step:5", "1"),  # one rank dies; the launcher takes the other down
    ("deepspeed_saved:step_00000006", None),  # DeepSpeed's part written, ours not
    ("checkpoint_write:step_00000008", "0"),  # rank 0 dies half-way through our folder
    ("checkpoint_write:export", "0"),  # during the export
]


@pytest.mark.slow
def test_prior_under_the_launcher_killed_at_five_points_ends_with_the_uninterrupted_weights(
    prior_data, tmp_path, ledger
):
    """The long case: ``deepspeed --num_gpus 2`` on CPU, ZeRO 1, five kills."""
    opts = ("run.steps=8", "run.ckpt_every=2", "run.keep=10", "deepspeed.zero_stage=1")
    ref, hit = tmp_path / "ref", tmp_path / "killed"

    def cmd(config: Path, *extra: str) -> list[str]:
        head = [launcher(), "--num_gpus", "2", "--master_port", str(free_port())]
        return [*head, str(ROOT / "launch" / "train_prior.py"), "--config", str(config), *extra]

    r = run(cmd(prior_config(prior_data, tmp_path, ref, *opts)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    config = prior_config(prior_data, tmp_path, hit, *opts)
    kind = "kill -9: prior, launcher, 2 ranks"
    for i, (kill, rank) in enumerate(PRIOR_LAUNCHER_KILLS):
        env = {"DALLE_REPRO_KILL_RANK": rank} if rank is not None else {}
        r = run(cmd(config, *(["--resume"] if i else [])), kill=kill, **env)
        ledger.injected(kind)
        assert r.returncode != 0, f"{kill} did not stop the run\n{r.stdout[-2000:]}"
        latest = check_checkpoints(hit)
        if kill.startswith(("deepspeed_saved", "checkpoint_write:step_")):
            assert latest < int(kill.split("_")[-1])
    r = run(cmd(config, "--resume"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ledger.survived(kind, len(PRIOR_LAUNCHER_KILLS))
    for name in ("model", "raw"):
        assert_same_weights(ref / "export" / f"{name}.safetensors", hit / "export" / f"{name}.safetensors")
    assert positions(ref, 8) == positions(hit, 8)
    ledger.lost(kind, 0)


# ----------------------------------------------------------------------------------------------
# SIGTERM (a preempted job) in the dVAE and CLIP trainers: a checkpoint, exit 0, then --resume


def sigterm_then_resume(ledger, kind: str, cmd: list[str], run_dir: Path, step: int) -> None:
    """``cmd`` gets SIGTERM after update ``step``: it must exit 0 with that step's checkpoint and
    nothing later, and ``--resume`` must finish the run."""
    r = run(cmd, kill=f"after_step:{step}", DALLE_REPRO_KILL_SIGNAL="TERM")
    ledger.injected(kind)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert '"ended": "signal"' in r.stdout, r.stdout[-2000:]
    assert check_checkpoints(run_dir) == step
    r = run([*cmd, "--resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert '"ended": "done"' in r.stdout, r.stdout[-2000:]
    ledger.survived(kind)


def test_dvae_sigterm_writes_a_checkpoint_and_resumes_to_the_uninterrupted_weights(emoji_dir, tmp_path, ledger):
    script = str(ROOT / "launch" / "train_dvae.py")
    opts = ["run.steps=8", "run.ckpt_every=100", "run.val_every=100", "run.keep=10"]
    ref, hit = tmp_path / "ref", tmp_path / "term"
    r = run([sys.executable, script, *dvae_overrides(emoji_dir, ref, *opts)])
    assert r.returncode == 0, r.stderr[-3000:]
    sigterm_then_resume(
        ledger, "SIGTERM: dVAE", [sys.executable, script, *dvae_overrides(emoji_dir, hit, *opts)], hit, 3
    )
    for name in ("model", "raw"):
        assert_same_weights(ref / "dvae" / f"{name}.safetensors", hit / "dvae" / f"{name}.safetensors")
    assert positions(ref, 8) == positions(hit, 8)


def clip_overrides(emoji_dir: Path, tokenizer: Path, run_dir: Path) -> list[str]:
    """A CLIP of one layer of width 32 on 16x16 emoji: a step in well under a second."""
    return [
        *("model.image_size=16", "model.patch_size=8", "model.width=32", "model.layers=1", "model.heads=2"),
        *("model.embed_dim=16", "model.text_len=12", f"text.path={tokenizer}"),
        *(f"data.shards={emoji_dir}/train/*.tar", f"run.val_shards={emoji_dir}/val/*.tar"),
        *("data.batch_size=8", "data.num_workers=1", f"run.run_dir={run_dir}", "run.steps=8"),
        *("run.ckpt_every=100", "run.val_every=4", "run.keep=10", "log.every=1"),
    ]


def test_clip_sigterm_writes_a_checkpoint_and_resumes_to_the_uninterrupted_weights(
    emoji_dir, tokenizer_path, tmp_path, ledger
):
    script = str(ROOT / "tools" / "train_clip.py")
    ref, hit = tmp_path / "ref", tmp_path / "term"
    r = run([sys.executable, script, *clip_overrides(emoji_dir, tokenizer_path, ref)])
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, script, *clip_overrides(emoji_dir, tokenizer_path, hit)]
    sigterm_then_resume(ledger, "SIGTERM: CLIP", cmd, hit, 5)
    assert_same_weights(ref / "clip" / "model.safetensors", hit / "clip" / "model.safetensors")
    assert positions(ref, 8) == positions(hit, 8)
    first = json.loads((ref / "clip" / "retrieval.json").read_text())
    again = json.loads((hit / "clip" / "retrieval.json").read_text())
    assert first["image_to_text_top1"] == again["image_to_text_top1"] and again["steps"] == 8
