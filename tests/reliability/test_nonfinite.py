"""Non-finite values: a NaN in the dVAE's input batch, and an overflow forced into one resblock of
the prior under DeepSpeed. The step (dVAE) or the block (prior) is skipped and counted, training
goes on to the end, and no checkpoint file ever holds a NaN or an inf, DeepSpeed's included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import dvae_overrides, prior_overrides
from safetensors.torch import load_file

from dalle_repro.core.config import load_config
from dalle_repro.train import dvae as train_dvae_module
from dalle_repro.train import prior as train_prior_module
from dalle_repro.train.deepspeed import load_state
from dalle_repro.train.metrics import read_metrics


def tensors_in(x, path="") -> list[tuple[str, torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        return [(path, x)]
    if isinstance(x, dict):
        return [t for k, v in x.items() for t in tensors_in(v, f"{path}.{k}")]
    if isinstance(x, (list, tuple)):
        return [t for i, v in enumerate(x) for t in tensors_in(v, f"{path}.{i}")]
    return []


def assert_no_nonfinite_in(run_dir: Path) -> int:
    """Every tensor of every checkpoint and export file is finite; returns how many files were read."""
    files = 0
    for p in sorted(run_dir.rglob("*")):
        if p.suffix == ".safetensors":
            items = list(load_file(str(p)).items())
        elif p.suffix == ".pt" and "deepspeed" in p.parts:
            items = tensors_in(load_state(p))
        else:
            continue
        files += 1
        bad = [k for k, t in items if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, f"{p}: {bad[:5]}"
    return files


def test_nan_in_the_dvae_batch_skips_the_step_and_is_counted(emoji_dir, tmp_path, monkeypatch, ledger):
    real = train_dvae_module.train_step
    poisoned = {3, 4}

    def train_step(st, images, cfg, dev):
        if st.step + 1 in poisoned:
            images = images.clone()
            images[0, :, 2:5, 2:5] = float("nan")
        return real(st, images, cfg, dev)

    monkeypatch.setattr(train_dvae_module, "train_step", train_step)
    run = tmp_path / "dvae"
    cfg = load_config(train_dvae_module.DVAETrainConfig, None, dvae_overrides(emoji_dir, run, "run.steps=8"))
    train_dvae_module.train(cfg)
    ledger.injected("NaN in a dVAE batch", len(poisoned))
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [int(r["skipped_steps"]) for r in rows] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] not in poisoned)
    assert assert_no_nonfinite_in(run) >= 4
    ledger.survived("NaN in a dVAE batch", len(poisoned))


@pytest.mark.parametrize("zero", [0, 2])
def test_an_overflowing_block_is_skipped_and_counted_under_deepspeed(prior_data, tmp_path, monkeypatch, ledger, zero):
    """Block 1's MLP returns inf gradients in two backward passes: that block skips those updates."""
    real = train_prior_module.Transformer
    calls = {"n": 0}
    overflow_at = {3, 4}  # backward passes (one micro-batch per step)

    def inf_grad(module, grad_in, grad_out):
        calls["n"] += 1
        if calls["n"] in overflow_at:
            return (torch.full_like(grad_in[0], float("inf")),)
        return None

    def build(args):
        model = real(args)
        model.blocks[1].mlp[0].register_full_backward_hook(inf_grad)
        return model

    monkeypatch.setattr(train_prior_module, "Transformer", build)
    run = tmp_path / "prior"
    over = prior_overrides(prior_data, run, "run.steps=8", "run.ckpt_every=2", f"deepspeed.zero_stage={zero}")
    result = train_prior_module.train(load_config(train_prior_module.PriorTrainConfig, None, over))
    ledger.injected("overflow in one prior block", len(overflow_at))
    assert result["step"] == 8 and np.isfinite(result["val_loss"])
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in rows)
    by_step = {r["step"]: r for r in rows}
    assert by_step[2]["skipped_blocks"] == 0 and by_step[4]["skipped_blocks"] >= 2
    assert by_step[8]["skipped_steps"] == 0  # only the block was skipped, never the whole step
    assert assert_no_nonfinite_in(run) >= 5
    ledger.survived("overflow in one prior block", len(overflow_at))
