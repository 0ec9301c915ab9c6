"""The benchmark's own diagnostics (bench/run.py): what they measure must be what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from dalle_repro import dvae
from dalle_repro.dvae import DVAE, DVAEArgs, logit_laplace_nll, map_pixels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_run"]


def _tiny():
    torch.manual_seed(0)
    args = DVAEArgs(image_size=8, n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16, n_init=8)
    return DVAE(args), torch.rand(2, 3, 8, 8)


@pytest.mark.parametrize("name", ["fixed_scale", "mse"])
def test_ablation_likelihood_reaches_the_training_loss(bench, name):
    """The --ablation swap must change the loss DVAE.forward trains on, and nothing else."""
    model, x = _tiny()
    out = model.decoder(torch.softmax(model.encoder(map_pixels(x)), 1)).float()
    mu, ln_b = out[:, :3], out[:, 3:]
    fn = bench.ABLATION_LIKELIHOODS[name]
    torch.manual_seed(1)
    paper = model(x, tau=1.0, beta=0.0).nll.item()
    with mock.patch.object(dvae, "logit_laplace_nll", fn):
        torch.manual_seed(1)
        swapped = model(x, tau=1.0, beta=0.0)
    assert swapped.nll.item() != pytest.approx(paper, rel=1e-3)
    swapped.loss.backward()
    ln_b_grad = model.decoder.blocks.output.conv.b.grad[3:]
    assert torch.count_nonzero(ln_b_grad) == 0, "the swapped likelihoods must not train ln b"
    assert dvae.logit_laplace_nll is logit_laplace_nll  # the patch is undone
    # Each swap is the formula it names, on the same statistics.
    xm = map_pixels(x)
    if name == "fixed_scale":
        assert torch.allclose(fn(xm, mu, ln_b), logit_laplace_nll(xm, mu, torch.zeros_like(ln_b)))
    else:
        assert torch.allclose(fn(xm, mu, ln_b), (torch.sigmoid(mu) - xm) ** 2)
