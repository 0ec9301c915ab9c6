"""The prior: shapes and errors, the loss weighting, pads, and no leak through the whole model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle_repro.core.config import ConfigError, load_config
from dalle_repro.models.transformer import Transformer, TransformerArgs

ARGS = dict(dim=32, depth=4, heads=4, text_len=6, text_vocab=40, grid=4, image_vocab=24, conv_kernel=3)


def make(**kw) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = Transformer(TransformerArgs(**(ARGS | kw)))
    text = torch.randint(0, 40, (3, 6))
    image = torch.randint(0, 24, (3, 16))
    return m, text, image


def test_shapes_and_fp32_logits():
    m, text, image = make()
    tl, il = m(text, image)
    assert tl.shape == (3, 5, 40) and il.shape == (3, 16, 24)
    assert tl.dtype == il.dtype == torch.float32
    assert [b.kind for b in m.blocks] == ["row", "column", "row", "conv"]


def test_loss_is_weighted_per_modality():
    m, text, image = make(text_loss_weight=0.25, image_loss_weight=0.5)
    out = m.loss(text, image)
    tl, il = m(text, image)
    t = F.cross_entropy(tl.reshape(-1, 40), text[:, 1:].reshape(-1))
    i = F.cross_entropy(il.reshape(-1, 24), image.reshape(-1))
    assert torch.allclose(out.text, t) and torch.allclose(out.image, i)
    assert torch.allclose(out.loss, 0.25 * t + 0.5 * i)


def test_pads_are_ordinary_targets():
    """Per-position pad ids are predicted like any text token (the paper does not mask them)."""
    m, text, image = make()
    padded = text.clone()
    padded[:, 3:] = 40 - 6 + torch.arange(3, 6)  # pad ids bpe_vocab + position
    tl, _ = m(padded, image)
    loss = m.loss(padded, image).text
    assert torch.allclose(loss, F.cross_entropy(tl.reshape(-1, 40), padded[:, 1:].reshape(-1)))


@pytest.mark.parametrize("backend", ["dense", "local"])
def test_no_leak_through_the_model(backend):
    m, text, image = make(attention=backend)
    m.eval()
    with torch.no_grad():
        base_t, base_i = m(text, image)
        for pos in (2, 5, 6, 9, 20):  # text positions 2, 5; image indices 0, 3, 14
            t2, i2 = text.clone(), image.clone()
            if pos < 6:
                t2[:, pos] = (t2[:, pos] + 1) % 40
            else:
                i2[:, pos - 6] = (i2[:, pos - 6] + 1) % 24
            new_t, new_i = m(t2, i2)
            # text logit p sits at position p; image logit j at position text_len - 1 + j.
            # Outputs at positions before ``pos`` must not move, and the one at ``pos`` must.
            nt, ni = min(pos, 5), max(0, pos - 5)
            assert torch.allclose(base_t[:, :nt], new_t[:, :nt], atol=1e-5), pos
            assert torch.allclose(base_i[:, :ni], new_i[:, :ni], atol=1e-5), pos
            moved = new_t[:, pos] if pos < 5 else new_i[:, pos - 5]
            assert not torch.allclose(moved, base_t[:, pos] if pos < 5 else base_i[:, pos - 5])


def test_backends_agree_in_the_model():
    m, text, image = make(attention="dense")
    loss_dense = m.loss(text, image).loss
    g_dense = torch.autograd.grad(loss_dense, list(m.parameters()))
    for b in m.blocks:
        b.attn.backend = "local"
    loss_local = m.loss(text, image).loss
    g_local = torch.autograd.grad(loss_local, list(m.parameters()))
    assert torch.allclose(loss_dense, loss_local, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_dense, g_local, strict=True))


def test_bad_input_and_args():
    m, text, image = make()
    with pytest.raises(ValueError, match=r"text tokens must be \(B, 6\)"):
        m(text[:, :5], image)
    with pytest.raises(ValueError, match=r"image tokens must lie in \[0, 24\)"):
        m(text, image + 24)
    with pytest.raises(ValueError, match="LongTensor"):
        m(text.float(), image)
    with pytest.raises(ConfigError, match="multiple of heads"):
        TransformerArgs(dim=30, heads=4)
    with pytest.raises(ConfigError, match="attention"):
        TransformerArgs(attention="sparse")


def test_a_few_steps_learn_a_fixed_batch():
    m, text, image = make()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m.loss(text, image).loss.item()
    for _ in range(30):
        loss = m.loss(text, image).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


# ------------------------------------------------------------------------------------------
# Cached decoding


@pytest.mark.parametrize("depth, grid, kernel, wrap", [(4, 4, 3, False), (6, 5, 3, True), (2, 6, 11, False)])
def test_cached_logits_equal_the_full_forward(depth, grid, kernel, wrap):
    torch.manual_seed(0)
    a = TransformerArgs(**(ARGS | dict(depth=depth, grid=grid, conv_kernel=kernel, conv_wrap=wrap, attention="dense")))
    m = Transformer(a).double().eval()
    text = torch.randint(0, 40, (2, 6))
    image = torch.randint(0, 24, (2, grid * grid))
    with torch.no_grad():
        _, full = m(text, image)
    caches = m.new_caches(2)
    got = [m.start_decoding(text, caches)]
    for i in range(grid * grid - 1):
        got.append(m.decode_step(image[:, i], i, caches))
    assert torch.allclose(torch.stack(got, 1), full, atol=1e-6)  # logits are fp32 by design
    kinds = {b.kind for b in m.blocks}
    assert {"row", "conv"} <= kinds and ("column" in kinds) == (depth >= 3)


def test_row_cache_holds_o_of_w_keys():
    from dalle_repro.models.kv_cache import cache_capacity
    from dalle_repro.models.masks import MaskSpec

    assert cache_capacity(MaskSpec("row", 256, 32)) == 33
    assert cache_capacity(MaskSpec("conv", 256, 32)) == 5 * 32 + 5 + 1
    assert cache_capacity(MaskSpec("column", 256, 32)) == 31 * 32 + 1


def test_generate_greedy_equals_uncached_greedy():
    m, text, _ = make(attention="dense")
    m.eval()
    fast = m.generate(text[:2], temperature=0)
    slow = torch.zeros(2, 16, dtype=torch.long)
    with torch.no_grad():
        for i in range(16):  # recompute the whole forward for each token
            _, logits = m(text[:2], slow)
            slow[:, i] = logits[:, i].argmax(-1)
    assert torch.equal(fast, slow)
    primed = m.generate(text[:2], temperature=0, prime=slow[:, :8])
    assert torch.equal(primed, slow)  # priming with its own greedy prefix changes nothing
    g = torch.Generator().manual_seed(3)
    a = m.generate(text[:2], temperature=1.0, top_k=5, generator=g)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a, m.generate(text[:2], temperature=1.0, top_k=5, generator=g))


def test_shipped_prior_configs_build():
    from dalle_repro.train.prior_config import PriorTrainConfig, model_with_paper_sizes

    root = Path(__file__).resolve().parents[1] / "configs"
    paper = load_config(PriorTrainConfig, root / "paper" / "prior.yaml")
    assert paper.model.unresolved() == ["text_len", "text_vocab", "grid", "image_vocab"]  # read off the files
    a = model_with_paper_sizes(paper)
    assert (a.dim, a.depth, a.heads, a.text_len, a.grid, a.image_vocab) == (3968, 64, 62, 256, 32, 8192)
    assert a.dim // a.heads == 64 and a.seq_len == 1280
    # ~12B parameters: 12 d^2 per layer plus embeddings and heads
    params = a.depth * 12 * a.dim**2 + (a.text_vocab + a.image_vocab) * a.dim * 2
    assert 11.5e9 < params < 12.5e9
    demo = load_config(PriorTrainConfig, root / "demo" / "prior.yaml")
    demo.model = dataclasses.replace(demo.model, text_len=24, text_vocab=1024 + 24, grid=8, image_vocab=512)
    m = Transformer(demo.model)
    m.enable_precision(demo.precision)
    text = torch.randint(0, demo.model.text_vocab, (2, demo.model.text_len))
    image = torch.randint(0, demo.model.image_vocab, (2, demo.model.n_image))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for step in range(1, 4):
        loss = m.loss(text, image).loss
        opt.zero_grad()
        loss.backward()
        m.scaler.end_step(m.branch_params(), step)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("extra", [dict(checkpoint=True), dict(sandwich_ln=True), dict(pb_relax=32.0)])
def test_options_train_and_checkpointing_changes_nothing(extra):
    m, text, image = make(**extra)
    loss = m.loss(text, image).loss
    grads = torch.autograd.grad(loss, list(m.parameters()))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if extra.get("checkpoint"):  # recomputation gives the very same gradients
        plain, _, _ = make()
        plain.load_state_dict(m.state_dict())
        ref = torch.autograd.grad(plain.loss(text, image).loss, list(plain.parameters()))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref, strict=True))
    if extra.get("sandwich_ln"):
        assert any(k.endswith("post_1.weight") for k in m.state_dict())
