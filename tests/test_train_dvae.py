"""dVAE training: schedules, a short run, checkpoints, exact resume, export, and pre-encoding."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import dvae_overrides
from safetensors.torch import load_file

from dalle_repro.core.config import load_config
from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.data.pre_encode import encode_token_shards
from dalle_repro.data.tar import iter_shard_samples
from dalle_repro.models.dvae import DVAE
from dalle_repro.train.dvae import DVAETrainConfig, schedule_at, train
from dalle_repro.train.metrics import read_metrics
from dalle_repro.train.optim import cosine

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(emoji_dir: Path, run_dir: Path, *extra: str) -> DVAETrainConfig:
    return load_config(DVAETrainConfig, None, dvae_overrides(emoji_dir, run_dir, *extra))


def test_schedules_at_their_endpoints():
    assert cosine(0, 1.0, 1 / 16, 100) == 1.0
    assert cosine(100, 1.0, 1 / 16, 100) == pytest.approx(1 / 16)
    assert cosine(10_000, 1.0, 1 / 16, 100) == pytest.approx(1 / 16)  # held after the anneal
    assert cosine(50, 0.0, 6.6, 100) == pytest.approx(3.3)
    paper = load_config(DVAETrainConfig, ROOT / "configs" / "paper" / "dvae.yaml")
    s = schedule_at(paper.schedule, 0)
    assert s == {"tau": 1.0, "beta": 0.0, "lr": 1e-4}
    s = schedule_at(paper.schedule, 1_200_000)
    assert s["tau"] == pytest.approx(1 / 16) and s["beta"] == pytest.approx(6.6) and s["lr"] == pytest.approx(1.25e-6)
    assert paper.model.vocab_size == 8192 and paper.model.n_hid == 256 and paper.data.batch_size * 64 == 512
    # the optional warm-up: linear from lr/W at update 0 to the cosine's value at update W-1, then the cosine alone
    warm = dataclasses.replace(paper.schedule, lr_warmup_steps=100)
    assert schedule_at(warm, 0)["lr"] == pytest.approx(1e-6)
    assert schedule_at(warm, 49)["lr"] == pytest.approx(0.5 * cosine(49, 1e-4, 1.25e-6, 1_200_000))
    assert schedule_at(warm, 100)["lr"] == schedule_at(paper.schedule, 100)["lr"]


def test_the_usage_term_anneals_to_zero_when_asked_and_the_model_gets_that_weight(emoji_dir, tmp_path, monkeypatch):
    from dalle_repro.train.dvae import LENGTH_KEYS, usage_weight_at

    held = tiny_config(emoji_dir, tmp_path / "held", "loss.usage_weight=2.0")
    assert [usage_weight_at(held, k) for k in (0, 3, 10_000)] == [2.0, 2.0, 2.0]  # null: the whole run
    cfg = tiny_config(emoji_dir, tmp_path / "run", "loss.usage_weight=2.0", "schedule.usage_steps=4")
    assert usage_weight_at(cfg, 0) == 2.0 and usage_weight_at(cfg, 2) == pytest.approx(1.0)
    assert usage_weight_at(cfg, 4) == 0.0 and usage_weight_at(cfg, 6) == 0.0
    assert "schedule.usage_steps" in LENGTH_KEYS  # scaled with the run's length, as the other schedules
    got = []
    forward = DVAE.forward

    def spy(self, images, tau, beta, usage_weight=0.0):
        got.append(usage_weight)
        return forward(self, images, tau, beta, usage_weight)

    monkeypatch.setattr(DVAE, "forward", spy)
    torch.set_num_threads(1)
    train(cfg)
    assert got == pytest.approx([cosine(k, 2.0, 0.0, 4) for k in range(6)]) and got[-1] == 0.0
    logged = [r["usage_weight"] for r in read_metrics(tmp_path / "run") if "usage_weight" in r]
    assert logged and logged[-1] == 0.0


def test_config_cross_checks(emoji_dir, tmp_path):
    from dalle_repro.core.config import ConfigError

    with pytest.raises(ConfigError, match="data.image_size"):
        tiny_config(emoji_dir, tmp_path, "data.image_size=32")


def test_run_writes_everything_and_resume_is_exact(emoji_dir, tmp_path):
    torch.set_num_threads(1)  # deterministic reductions for the comparison
    train(tiny_config(emoji_dir, tmp_path / "full"))
    full = read_metrics(tmp_path / "full")
    losses = [r["loss"] for r in full if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert any("val_psnr" in r for r in full) and any("val_codes_used" in r for r in full)
    ckpts = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (tmp_path / "full" / "recon_latest.png").is_file() and (tmp_path / "full" / "config.yaml").is_file()
    exported = DVAE.from_pretrained(tmp_path / "full" / "dvae")
    assert exported.args.vocab_size == 32
    ema = load_file(str(tmp_path / "full" / "checkpoints" / "step_00000006" / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())

    # the same run, stopped at step 3 and resumed
    train(tiny_config(emoji_dir, tmp_path / "split", "run.steps=3"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(emoji_dir, tmp_path / "split"))
    train(tiny_config(emoji_dir, tmp_path / "split"), resume_run=True)
    split = [r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r]
    assert split == losses
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_the_loss(emoji_dir, tmp_path):
    train(
        tiny_config(
            emoji_dir,
            tmp_path,
            "run.steps=30",
            "run.val_every=30",
            "run.ckpt_every=30",
            "schedule.beta_end=0.5",
            "schedule.lr_steps=1000",
            "schedule.lr_start=0.005",
        )
    )
    rows = [r for r in read_metrics(tmp_path) if "nll_bpd" in r]
    first, last = np.mean([r["nll_bpd"] for r in rows[:5]]), np.mean([r["nll_bpd"] for r in rows[-5:]])
    assert last < first - 0.15


def test_encode_tokens_round_trip_and_bad_samples(emoji_dir, tmp_path):
    cfg = tiny_config(emoji_dir, tmp_path / "run", "run.steps=2", "run.val_every=2", "run.ckpt_every=2")
    train(cfg)
    dvae_dir = tmp_path / "run" / "dvae"
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "val").mkdir()
    for split in ("train", "val"):
        for p in sorted((emoji_dir / split).glob("*.tar"))[:2]:
            (src / split / p.name).write_bytes(p.read_bytes())
    bad = src / "train" / "00000.tar"
    with tarfile.open(bad, "a") as t:
        for name, data in (("zbad.png", b"not an image"), ("zbad.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    shards = sorted(str(p) for p in src.rglob("*.tar"))
    out = tmp_path / "tokens"
    s = encode_token_shards(dvae_dir, shards, out, batch_size=5)
    n_images = sum(1 for _ in iter_shard_samples(shards)) - 1
    assert s["written"] == n_images and s["skipped"] == {"not_an_image": 1}
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.tar")) == sorted(
        str(Path(p).relative_to(src)) for p in shards
    )
    # the tokens are the dVAE's encoding of the images, and the loader reads them back
    model = DVAE.from_pretrained(dvae_dir)
    images = Loader(shards, DataArgs(image_size=16, batch_size=64, num_workers=0, shuffle=False), epochs=1)
    tokens = Loader(
        str(out / "train" / "*.tar") + "," + str(out / "val" / "*.tar"),
        DataArgs(kind="tokens", batch_size=64, num_workers=0, shuffle=False),
        epochs=1,
    )
    by_key = {}
    for b in tokens:
        for k, t in zip(b["key"], b["image_tokens"], strict=True):
            by_key[k] = t
    for b in images:
        enc = model.encode(b["image"].float() / 255)
        for k, t in zip(b["key"], enc, strict=True):
            assert torch.equal(by_key[k], t)
    meta = json.loads(next(iter_shard_samples([str(out / "val" / "00000.tar")]))[1]["json"])
    assert meta["grid"] == [4, 4] and meta["vocab_size"] == 32
    # a rerun skips what is done
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    encode_token_shards(dvae_dir, shards, out, batch_size=5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == mtimes


def test_two_ranks_under_the_deepspeed_launcher(emoji_dir, tmp_path):
    """Data-parallel training started by `deepspeed` with 2 CPU ranks: replicas stay identical."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(launcher).exists():
        pytest.skip("deepspeed is not installed (tools/setup.sh --dev installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(
        emoji_dir, tmp_path / "ddp", "run.steps=4", "run.ckpt_every=2", "run.val_every=4", "data.batch_size=4"
    )
    from dalle_repro.core.config import save_config

    save_config(cfg, tmp_path, "cfg.yaml")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            launcher,
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            str(ROOT / "launch" / "train_dvae.py"),
            "--config",
            str(tmp_path / "cfg.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step_00000004" / "state.json").read_text())
    ranks = state["ranks"]
    assert len(ranks) == 2 and ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["loader"]["rank"] == 0 and ranks[1]["loader"]["rank"] == 1


def test_fp16_on_cpu_fails_before_any_work(emoji_dir, tmp_path):
    from dalle_repro.core.config import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(tiny_config(emoji_dir, tmp_path / "r", "precision.dtype=fp16", "run.device=cpu"))
    assert not (tmp_path / "r").exists()


def test_config_yaml_notes_the_precision_auto_picked_and_still_loads(emoji_dir, tmp_path, monkeypatch):
    from dalle_repro.core import precision
    from dalle_repro.core.precision import Pick, pick_precision

    extra = ("run.device=cpu", "run.ckpt_every=2", "run.val_every=2")
    cfg = tiny_config(emoji_dir, tmp_path, "run.steps=2", *extra)
    assert cfg.precision.dtype == "auto"  # the default
    train(cfg)
    path = tmp_path / "config.yaml"
    pick = pick_precision("auto", "cpu", "precision.dtype")
    assert path.read_text().startswith(f"# precision: {pick.reason}\n")
    assert pick.reason.startswith(f"precision.dtype=auto picked {pick.dtype}: this CPU (")
    assert load_config(DVAETrainConfig, path) == cfg  # the user's value, auto, is what is kept
    # resumed on a machine where auto picks the other way: it picks again, and says so
    other = "fp32" if pick.dtype == "bf16" else "bf16"
    monkeypatch.setattr(precision, "_auto", lambda *_: Pick(other, f"{other}: another machine"))
    train(tiny_config(emoji_dir, tmp_path, "run.steps=3", *extra), resume_run=True)
    assert path.read_text().startswith(f"# precision: precision.dtype=auto picked {other}: another machine\n")
    assert load_config(DVAETrainConfig, path).precision.dtype == "auto"
    for kept in (tmp_path / "dvae" / "config.yaml", tmp_path / "checkpoints" / "step_00000003" / "config.yaml"):
        assert load_config(DVAETrainConfig, kept).precision.dtype == "auto"


def test_fused_adamw_state_gets_its_parameters_layout_back():
    """Checkpoints store optimizer state contiguous; the fused AdamW pairs elements by memory order,
    so a channels_last weight must get channels_last state back, or the resumed run drifts."""
    from dalle_repro.train.optim import adamw, load_optimizer_state

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3)).to(memory_format=torch.channels_last)

    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)

    def step(model, opt):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    model = make()
    opt = adamw(model, 1e-2, (0.9, 0.999), 1e-8, 1e-4)
    for _ in range(3):
        step(model, opt)
    saved_model = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    saved_opt = {
        **saved_opt,
        "state": {i: {k: v.contiguous().clone() for k, v in s.items()} for i, s in saved_opt["state"].items()},
    }
    for _ in range(2):
        step(model, opt)

    resumed = make()
    resumed.load_state_dict(saved_model)
    opt2 = adamw(resumed, 1e-2, (0.9, 0.999), 1e-8, 1e-4)
    load_optimizer_state(opt2, saved_opt)
    for _ in range(2):
        step(resumed, opt2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_bad_validation_path_is_refused_before_the_first_update(emoji_dir, tmp_path, monkeypatch):
    """A validation path naming no file trained every update, then failed at the final validation
    with no checkpoint written."""
    from dalle_repro.core.config import ConfigError
    from dalle_repro.train import dvae as td

    monkeypatch.setattr(td, "train_step", lambda *a: pytest.fail("an update ran"))
    with pytest.raises(ConfigError, match=r"run.val_shards: shard pattern .*nowhere.* matches no file"):
        train(tiny_config(emoji_dir, tmp_path / "r", f"run.val_shards={tmp_path}/nowhere/*.tar"))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_too_few_shards_for_the_workers_fail_before_the_model_is_built(emoji_dir, tmp_path, monkeypatch):
    from dalle_repro.core.config import ConfigError
    from dalle_repro.train import dvae as td

    monkeypatch.setattr(td, "DVAE", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=r"data.shards: \d+ shards cannot feed 1 ranks x 64 workers.*--shard-size"):
        train(tiny_config(emoji_dir, tmp_path / "r", "data.num_workers=64"))


def test_a_failing_final_validation_keeps_the_finished_runs_checkpoint_and_export(emoji_dir, tmp_path, monkeypatch):
    """The last checkpoint and the export are written before the final validation, which may fail."""
    from dalle_repro.train import dvae as td
    from dalle_repro.train.checkpoint import Checkpoints

    def broken(*a, **k):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(td, "validate", broken)
    run = tmp_path / "r"
    with pytest.raises(RuntimeError, match="validation broke"):
        train(tiny_config(emoji_dir, run, "run.val_every=100", "run.ckpt_every=100"))
    latest = Checkpoints(run).latest()
    assert latest is not None and latest.name == "step_00000006"
    assert (run / "dvae" / "model.safetensors").is_file()


def test_channel_shuffle_permutes_whole_images_and_keeps_the_rest():
    from dalle_repro.train.dvae import shuffle_channels

    torch.manual_seed(0)
    x = torch.rand(64, 3, 4, 4)
    assert shuffle_channels(x, 0.0) is x
    y = shuffle_channels(x, 1.0)
    for a, b in zip(x, y, strict=True):
        # every image is another order of its own channels, never the same order (p=1)
        match = [int(torch.equal(b[i], a[j])) for i in range(3) for j in range(3)]
        assert sum(match) == 3 and not torch.equal(a, b)
    orders = {tuple(int((y[k][i] == x[k]).flatten(1).all(1).nonzero()) for i in range(3)) for k in range(64)}
    assert len(orders) == 5  # the five non-identity orders all occur
    torch.manual_seed(1)
    half = shuffle_channels(x, 0.5)
    kept = sum(torch.equal(a, b) for a, b in zip(x, half, strict=True))
    assert 16 < kept < 48


def test_a_collapsed_codebook_stops_the_run_with_a_checkpoint_and_says_what_happened(monkeypatch, tmp_path):
    """A validation from update 200 on with at most loss.collapse_codes codes: a checkpoint, then
    CodebookCollapsed (exit status 3 from the command); before update 200, or with 0, it trains on."""
    from types import SimpleNamespace

    from dalle_repro.core.config import load_config
    from dalle_repro.train import dvae as tdvae

    cfg = load_config(tdvae.DVAETrainConfig, "configs/demo/dvae.yaml", [f"run.run_dir={tmp_path}"])
    monkeypatch.setattr(tdvae, "_validate_and_show", lambda *a: {"val_codes_used": 1.0, "val_psnr": 13.3})
    saved = []
    d = SimpleNamespace(is_main=True, device=torch.device("cpu"))
    task = SimpleNamespace(
        st=None, run_cfg=cfg, config=cfg, d=d, run_dir=tmp_path, step=520, save=lambda: saved.append(1)
    )
    with pytest.raises(
        tdvae.CodebookCollapsed, match=r"collapsed: at update 520 .* use 1 of 512 codes \(PSNR 13.3 dB\)"
    ):
        tdvae.DVAETask.evaluate(task, True, False)
    assert saved == [1]
    task.step = 150  # early: a codebook may still spread
    assert tdvae.DVAETask.evaluate(task, True, False)["val_codes_used"] == 1.0
    task.step, cfg.loss.collapse_codes = 520, 0
    assert tdvae.DVAETask.evaluate(task, True, False)["val_codes_used"] == 1.0 and saved == [1]
    monkeypatch.setattr(tdvae, "_validate_and_show", lambda *a: {"val_codes_used": 300.0})
    cfg.loss.collapse_codes = 2
    assert tdvae.DVAETask.evaluate(task, True, False)["val_codes_used"] == 300.0
