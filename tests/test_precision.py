"""The paper's mixed precision: per-branch scaling, the non-finite filter, per-branch skips, the rule."""

from __future__ import annotations

import math
import platform
import subprocess
import sys

import pytest
import torch
from helpers import dvae_overrides

from dalle_repro.core import precision
from dalle_repro.core.precision import PrecisionArgs
from dalle_repro.models.block_scaling import BlockScaler
from dalle_repro.models.transformer import Transformer, TransformerArgs

ARGS = dict(dim=32, depth=3, heads=4, text_len=6, text_vocab=40, grid=4, image_vocab=24, conv_kernel=3)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 40, (4, 6), generator=g), torch.randint(0, 24, (4, 16), generator=g)


def test_scale_rule_growth_decay_rate_limit_and_clamps():
    s = BlockScaler(2, PrecisionArgs(dtype="fp16"))
    assert s.scales.tolist() == [2**13] * 2  # no factor of the ranks (core/precision.py: the factor M)
    s._update(0, True, step=1)
    assert s.scales[0] == pytest.approx(2**13 * 2 ** (1 / 1000))
    s._update(1, False, step=1)
    assert s.scales[1] == pytest.approx(2**13 / math.sqrt(2))
    s._update(1, False, step=50)  # within 125 updates of the last decrease: no second drop
    assert s.scales[1] == pytest.approx(2**13 / math.sqrt(2))
    s._update(1, False, step=126)
    assert s.scales[1] == pytest.approx(2**13 / 2)
    for step in range(200, 200 + 125 * 40, 125):
        s._update(1, False, step)
    assert s.scales[1] == 2**7  # clamped below at 2^7
    for step in range(20_000):
        s._update(0, True, step)
    assert s.scales[0] == 2**24  # clamped above at 2^24
    assert s.skipped_total.tolist() == [0, 43]


def test_bf16_keeps_the_filter_without_scaling():
    s = BlockScaler(3, PrecisionArgs(dtype="bf16"))
    assert s.scales.tolist() == [1.0, 1.0, 1.0]
    s._update(0, False, 500)
    assert s.scales[0] == 1.0 and s.skipped_total[0] == 1


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_scaled_model_matches_plain_gradients(dtype):
    """With finite gradients the scaling is invisible: the same grads as an unscaled model (fp32)."""
    torch.manual_seed(0)
    plain = Transformer(TransformerArgs(**ARGS))
    scaled = Transformer(TransformerArgs(**ARGS))
    scaled.load_state_dict(plain.state_dict())
    scaler = scaled.enable_precision(PrecisionArgs(dtype=dtype))
    scaler.scales.fill_(1024.0)  # a scale that must cancel out (hooks run in fp32 too)
    text, image = batch()
    plain.loss(text, image).loss.backward()
    scaled.loss(text, image).loss.backward()
    assert scaler.end_step(scaled.branch_params(), step=1) == ([], False)
    tol = 1e-5 if dtype == "fp32" else 5e-2
    for (name, a), b in zip(plain.named_parameters(), scaled.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=tol, rtol=tol), name


def test_residual_stream_is_fp32_and_branches_are_half():
    torch.manual_seed(0)
    m = Transformer(TransformerArgs(**ARGS))
    m.enable_precision(PrecisionArgs(dtype="bf16"))
    seen = {}

    def record(name):
        def hook(mod, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is left alone

        return hook

    m.blocks[0].mlp[0].register_forward_hook(record("mlp"))
    m.blocks[1].register_forward_hook(record("stream"))
    text, image = batch()
    tl, il = m(text, image)
    assert seen == {"mlp": torch.bfloat16, "stream": torch.float32}
    assert tl.dtype == il.dtype == torch.float32


def test_a_branch_with_inf_gradients_is_filtered_skipped_and_rescaled():
    torch.manual_seed(0)
    m = Transformer(TransformerArgs(**ARGS))
    scaler = m.enable_precision(PrecisionArgs(dtype="fp16" if torch.cuda.is_available() else "bf16"))
    scaler.scaled = True  # exercise the scale rule on CPU too (bf16 compute, fp16 rule)
    scaler.scales.fill_(2.0**13)
    bad = 3  # the MLP branch of layer 2
    m.blocks[1].mlp[0].register_full_backward_hook(lambda mod, gin, gout: (torch.full_like(gin[0], float("inf")),))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    text, image = batch()
    frozen = {id(p): p.detach().clone() for p in m.branch_params()[bad]}
    losses, leaving_grads = [], []
    m.blocks[1].register_full_backward_hook(lambda mod, gin, gout: leaving_grads.append(gin[0]))
    for step in range(1, 21):
        opt.zero_grad(set_to_none=True)
        loss = m.loss(text, image).loss
        loss.backward()
        skipped, _ = scaler.end_step(m.branch_params(), step)
        assert skipped == [bad]
        assert all(p.grad is None for p in m.branch_params()[bad])
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(g).all() for g in leaving_grads)  # the filter cleaned what left the branch
    assert all(torch.equal(p, frozen[id(p)]) for p in m.branch_params()[bad])  # its update was skipped
    assert losses[-1] < losses[0] - 0.5  # everything else learns
    assert scaler.scales[bad] < 2.0**13 and scaler.scales[bad - 1] > 2.0**13
    assert int(scaler.skipped_total[bad]) == 20


def test_scaler_state_round_trips():
    s = BlockScaler(4, PrecisionArgs(dtype="fp16"))
    s._update(2, False, 10)
    t = BlockScaler(4, PrecisionArgs(dtype="fp16"))
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.scales, s.scales) and torch.equal(t.last_decay, s.last_decay)
    with pytest.raises(ValueError, match="branches"):
        BlockScaler(2, PrecisionArgs(dtype="fp16")).load_state_dict(s.state_dict())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_unscaled_filter_hands_back_a_finite_gradient_untouched_and_zeros_nonfinite_values(dtype):
    s = BlockScaler(2, PrecisionArgs(dtype=dtype))
    g = torch.randn(64, 32)
    assert s._filter(0, g, 1.0) is g  # no copy, no rounding
    big = torch.full((8,), 3e38)  # finite, but its sum overflows: still finite, not flagged
    assert s._filter(1, big, 1.0) is big
    assert not s.flags.any()
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        s.flags.zero_()
        bad = g.clone()
        bad[3, 5] = bad_value
        out = s._filter(1, bad, 1.0)
        assert s.flags.tolist() == [False, True, False]
        assert out[3, 5] == 0 and torch.isnan(bad[3, 5]) == math.isnan(bad_value)  # the input is left alone
        keep = torch.ones_like(g, dtype=torch.bool)
        keep[3, 5] = False
        assert torch.equal(out[keep], g[keep])


def test_scaled_filter_divides_and_zeros():
    s = BlockScaler(1, PrecisionArgs(dtype="fp16"))
    g = torch.tensor([2.0, 4.0, float("inf"), float("nan")])
    assert s._filter(0, g[:2], 4.0).tolist() == [0.5, 1.0] and not s.flags.any()
    assert s._filter(0, g, 4.0).tolist() == [0.5, 1.0, 0.0, 0.0] and bool(s.flags[0])
    assert math.isinf(g[2]) and math.isnan(g[3])


def test_fp32_model_gradients_are_bit_identical_and_a_nan_skips_only_its_branch():
    """fp32 (s = 1): the hooks leave finite gradients exactly as a plain model's; a NaN produced in
    one branch flags that branch only, and what leaves it is zeroed."""
    torch.manual_seed(0)
    plain = Transformer(TransformerArgs(**ARGS))
    hooked = Transformer(TransformerArgs(**ARGS))
    hooked.load_state_dict(plain.state_dict())
    scaler = hooked.enable_precision(PrecisionArgs(dtype="fp32"))
    text, image = batch()
    plain.loss(text, image).loss.backward()
    hooked.loss(text, image).loss.backward()
    assert scaler.end_step(hooked.branch_params(), step=1) == ([], False)
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name

    hooked.zero_grad(set_to_none=True)
    nan_grad = lambda mod, gin, gout: (torch.full_like(gin[0], float("nan")),)  # noqa: E731
    hooked.blocks[2].attn.proj.register_full_backward_hook(nan_grad)  # branch 4: attention of layer 3
    leaving = []
    hooked.blocks[2].register_full_backward_hook(lambda mod, gin, gout: leaving.append(gin[0]))
    hooked.loss(text, image).loss.backward()
    assert scaler.end_step(hooked.branch_params(), step=2) == ([4], False)
    assert all(p.grad is None for p in hooked.branch_params()[4])
    assert all(torch.isfinite(p.grad).all() for p in hooked.parameters() if p.grad is not None)
    assert torch.isfinite(leaving[0]).all()


# A product whose operands are all the smallest fp32 denormal (1.4e-45), on two threads: zero where
# denormals are flushed (in every thread of the intra-op pool), the denormal itself where they are not.
DENORMAL_PRODUCT = """
import torch
from dalle_repro.core.precision import denormals_flushed, flushing_denormals
torch.set_num_threads(2)
def nonzero():
    x = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)
    return int((x * 1.0).count_nonzero())
{body}
"""


def _run(body: str) -> list[str]:
    code = DENORMAL_PRODUCT.format(body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86's FTZ/DAZ flags")
def test_denormals_are_flushed_in_every_thread_while_training_and_python_gets_its_floats_back():
    # a trained dVAE's updates ran 2.5x slower on denormal gradients (precision.denormals_flushed)
    assert _run("print(nonzero(), flushing_denormals())") == [str(1 << 20), "False"]  # the control
    inside = "with denormals_flushed() as ok:\n    print(ok, nonzero(), flushing_denormals())"
    after = "print(nonzero(), flushing_denormals())"
    ok, zero, inner, later, outer = _run(f"{inside}\n{after}")
    assert (ok, zero, inner, outer) == ("True", "0", "True", "False")
    assert 0 < int(later) < 1 << 20  # the pool's thread keeps flushing its share, this thread no longer


def test_the_trainers_and_the_demo_run_with_denormals_flushed(emoji_dir, tmp_path, monkeypatch):
    from dalle_repro.core.config import load_config
    from dalle_repro.demo.pipeline import run_demo
    from dalle_repro.train import clip, dvae, prior

    seen = []

    def step(*args, **kwargs):
        seen.append(precision.flushing_denormals())
        return plain_step(*args, **kwargs)

    plain_step = dvae.train_step
    monkeypatch.setattr(dvae, "train_step", step)
    dvae.train(load_config(dvae.DVAETrainConfig, None, dvae_overrides(emoji_dir, tmp_path / "run")))
    assert seen == [True] * 6 and not precision.flushing_denormals()
    for entry in (prior.train, clip.train_clip, run_demo):  # the same decorator
        assert entry.__wrapped__ is not None and entry.__code__ is dvae.train.__code__
