"""The paper's masks: hand-written small cases, their properties, and the sparse key lists."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle_repro.kernels import cpu as cpu_kernels
from dalle_repro.models import attention
from dalle_repro.models.attention import attend, flex_densities
from dalle_repro.models.masks import KINDS, MaskSpec, allowed, dense_mask, image_key_lists, layer_kind

T, G = 3, 4  # 3 text tokens, a 4x4 image grid


def image_keys(mask: torch.Tensor, i: int) -> set[int]:
    """The image indices that image query ``i`` may attend."""
    return {j for j in range(G * G) if mask[T + i, T + j]}


def test_hand_written_row():
    m = dense_mask("row", T, G)
    assert image_keys(m, 5) == {1, 2, 3, 4, 5}  # itself and the previous W = 4, across a row break
    assert image_keys(m, 0) == {0}
    assert image_keys(m, 15) == {11, 12, 13, 14, 15}


def test_hand_written_column():
    m = dense_mask("column", T, G)
    assert image_keys(m, 9) == {1, 5, 9}
    assert image_keys(m, 3) == {3}
    assert image_keys(m, 14) == {2, 6, 10, 14}


def test_hand_written_conv_and_wrap():
    m = dense_mask("conv", T, G, conv_kernel=3)
    assert image_keys(m, 5) == {0, 1, 2, 4, 5}
    assert image_keys(m, 4) == {0, 1, 4}
    wrapped = dense_mask("conv", T, G, conv_kernel=3, wrap=True)
    assert image_keys(wrapped, 4) == {0, 1, 3, 4}  # column 3 is beside column 0 when wrapping
    big = dense_mask("conv", T, G)  # 11x11 covers a 4x4 grid: every earlier token
    assert image_keys(big, 10) == set(range(11))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", [3, 5, 8])
def test_properties(kind, grid):
    text = 4
    m = dense_mask(kind, text, grid)
    n = text + grid * grid
    assert m.shape == (n, n) and m.dtype == torch.bool
    assert not (m & ~torch.ones(n, n, dtype=torch.bool).tril()).any()  # causal
    assert m.diagonal().all()  # every token sees itself
    assert m[text:, :text].all()  # image sees all text
    assert not m[:text, text:].any()  # text never sees image
    assert torch.equal(m[:text, :text], torch.ones(text, text, dtype=torch.bool).tril())
    img = m[text:, text:]
    rows = img.sum(1)
    if kind == "row":
        assert (rows[grid:] == grid + 1).all()  # the window is exactly W + 1 wide
        for i in range(grid * grid):
            assert img[i].nonzero().flatten().tolist() == list(range(max(0, i - grid), i + 1))
    if kind == "column":
        for i in range(grid * grid):
            keys = img[i].nonzero().flatten()
            assert (torch.diff(keys) == grid).all() and keys[-1] == i  # stride exactly W


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid, kernel, wrap", [(4, 3, False), (6, 5, True), (8, 11, False), (5, 11, True)])
def test_key_lists_equal_the_reference(kind, grid, kernel, wrap):
    spec = MaskSpec(kind, 2, grid, conv_kernel=kernel, wrap=wrap)
    idx, valid = image_key_lists(spec)
    ref = dense_mask(kind, 2, grid, conv_kernel=kernel, wrap=wrap)[2:, 2:]
    got = torch.zeros_like(ref)
    for i in range(grid * grid):
        got[i, idx[i][valid[i]]] = True
        assert len(set(idx[i][valid[i]].tolist())) == int(valid[i].sum())  # no key twice
    assert torch.equal(got, ref)
    if kind == "row":
        assert idx.shape[1] == grid + 1


def test_layer_schedule():
    assert [layer_kind(i, 4) for i in range(1, 5)] == ["row", "column", "row", "conv"]
    assert [layer_kind(i, 8) for i in range(1, 9)] == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert layer_kind(64, 64) == "conv" and layer_kind(62, 64) == "column"
    with pytest.raises(ValueError):
        layer_kind(0, 4)


def test_bad_specs():
    with pytest.raises(ValueError, match="kind"):
        dense_mask("diagonal", 2, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="odd"):
        dense_mask("conv", 2, 4, conv_kernel=4)


# ------------------------------------------------------------------------------------------
# Backends against the dense reference


@pytest.fixture(params=["kernel", "blocked"])
def local_path(request, monkeypatch):
    """Runs a test of the local backend through each of its two paths: the compiled CPU kernel
    (with the blocked path made to fail, so a silent fallback cannot pass), and the blocked
    matrix products (with the kernel switched off)."""
    if request.param == "blocked":
        monkeypatch.setenv(cpu_kernels.SWITCH, "off")
    else:
        assert cpu_kernels.load() is not None, "the CPU attention kernel did not build"

        def refuse(*args, **kwargs):
            raise AssertionError("the kernel path fell back to blocked products")

        monkeypatch.setattr(attention, "blocked_attention", refuse)
    return request.param


def _qkv(spec: MaskSpec, seed: int, b: int = 2, h: int = 3, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, spec.n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "text, grid, kernel, wrap",
    [(5, 4, 3, False), (7, 6, 5, True), (3, 8, 11, False), (4, 16, 3, False), (2, 16, 5, True), (0, 10, 1, False)],
)
def test_local_backend_equals_dense_forward_and_backward(kind, text, grid, kernel, wrap, local_path):
    spec = MaskSpec(kind, text, grid, conv_kernel=kernel, wrap=wrap)
    q, k, v = _qkv(spec, seed=grid)
    g_out = torch.randn(2, 3, spec.n, 8, dtype=torch.float64)
    outs, grads = [], []
    for backend in ("dense", "local"):
        out = attend(q, k, v, spec, backend)
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), g_out)
        outs.append(out)
        grads.append((gq, gk, gv))
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid, wrap", [(8, False), (5, True)])
def test_flex_backend_equals_dense_forward(kind, grid, wrap):
    """Forward only: FlexAttention has no backward on CPU (its gradients are checked on CUDA only)."""
    spec = MaskSpec(kind, 4, grid, conv_kernel=5, wrap=wrap)
    q, k, v = (x.detach().float() for x in _qkv(spec, seed=1))
    with torch.no_grad():
        assert torch.allclose(attend(q, k, v, spec, "flex"), attend(q, k, v, spec, "dense"), atol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "local", "flex"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_leak(kind, backend, local_path):
    """Changing the key and value at position t changes no output before t."""
    spec = MaskSpec(kind, 3, 5, conv_kernel=3)
    q, k, v = (x.detach().float() for x in _qkv(spec, seed=2))
    with torch.no_grad():
        base = attend(q, k, v, spec, backend)
        for t in (0, 2, 3, 9, spec.n - 1):
            k2, v2 = k.clone(), v.clone()
            k2[:, :, t] += 5
            v2[:, :, t] -= 5
            out = attend(q, k2, v2, spec, backend)
            assert torch.allclose(out[:, :, :t], base[:, :, :t], atol=1e-6), t
            assert not torch.allclose(out[:, :, t], base[:, :, t])


@pytest.mark.parametrize("backend", ["dense", "local"])
@pytest.mark.parametrize("kind", KINDS)
def test_pb_relax_is_the_same_softmax(kind, backend, local_path):
    spec = MaskSpec(kind, 4, 5, conv_kernel=3)
    q, k, v = _qkv(spec, seed=4)
    g = torch.randn(2, 3, spec.n, 8, dtype=torch.float64)
    ref = attend(q, k, v, spec, "dense")
    out = attend(q, k, v, spec, backend, pb_relax=32.0)
    assert torch.allclose(out, ref, atol=1e-10)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(out, (q, k, v), g), strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    with torch.no_grad():
        flex = attend(q.float(), k.float(), v.float(), spec, "flex", pb_relax=32.0)
    assert torch.allclose(flex.double(), ref, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_local_backend_under_bf16_autocast(kind, local_path):
    """The hand-written backwards under CPU autocast: fp32 inputs get fp32 gradients, and output and
    gradients stay within bf16 rounding of the float64 reference."""
    spec = MaskSpec(kind, 6, 8, conv_kernel=5)
    q, k, v = _qkv(spec, seed=7, d=16)
    g = torch.randn(2, 3, spec.n, 16, dtype=torch.float64)
    ref = attend(q, k, v, spec, "dense")
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q32, k32, v32, spec, "local")
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (q32, k32, v32), g.to(out.dtype))
    assert all(x.dtype == torch.float32 for x in grads)
    assert (out.double() - ref).abs().max() < 0.05
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a.double() - b).abs().max() < 0.05 * max(1.0, b.abs().max().item())


def test_pb_relax_keeps_fp16_scores_finite(local_path):
    """q.k of 100,000 overflows fp16 (max 65,504); PB-relax forms q.k from q / alpha instead."""
    spec = MaskSpec("row", 2, 3)
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 1, spec.n, 64), 40.0, dtype=torch.float16)
    k = torch.full_like(q, 40.0) + torch.randn(q.shape, generator=g).half()
    v = torch.randn(q.shape, generator=g).half()
    plain = q @ k.transpose(-1, -2)  # what an unrelaxed fp16 score matmul produces
    assert torch.isinf(plain).any()
    out = attend(q, k, v, spec, "local", pb_relax=32.0)
    assert torch.isfinite(out).all()
    # each output is a convex combination of value rows: inside their per-dimension range
    lo, hi = v.float().amin(2, keepdim=True), v.float().amax(2, keepdim=True)
    assert ((out.float() >= lo - 1e-2) & (out.float() <= hi + 1e-2)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", [8, 16])
def test_flex_backend_equals_dense_forward_and_backward_on_cuda(kind, grid):
    spec = MaskSpec(kind, 16, grid)
    q, k, v = (x.detach().float().cuda().requires_grad_() for x in _qkv(spec, seed=grid, d=64))
    g = torch.randn(2, 3, spec.n, 64, device="cuda")
    ref = attend(q, k, v, spec, "dense")
    out = attend(q, k, v, spec, "flex")
    assert torch.allclose(out, ref, atol=2e-3)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(out, (q, k, v), g), strict=True):
        assert torch.allclose(a, b, atol=2e-3)


def paper_stack_block_density(block: int) -> float:
    kinds = [layer_kind(layer, 64) for layer in range(1, 65)]  # 47 row, 16 column, 1 conv
    per_kind = {kind: flex_densities(MaskSpec(kind, 256, 32), block)[0] for kind in set(kinds)}
    return sum(per_kind[kind] for kind in kinds) / len(kinds)


def test_flex_block_density_follows_the_mask_at_the_papers_shape():
    """Block density, from the BlockMask, as a fraction of causal (text 256 + grid 32). Before the
    column-major order for column layers, a column layer visited every earlier key block (1.00) and
    the paper's stack 0.715 at flex's 128-token blocks. The mask's own element density (0.38-0.42
    per kind: every image query attends all 256 text keys, 0.32 of causal by itself) bounds what
    any layout can reach."""
    col128, elem_col = flex_densities(MaskSpec("column", 256, 32), 128)
    assert col128 < 0.5 and elem_col == pytest.approx(0.38, abs=0.01)
    stack = {b: paper_stack_block_density(b) for b in (128, 64, 32)}
    assert stack[128] == pytest.approx(0.588, abs=0.005)
    assert stack[64] == pytest.approx(0.484, abs=0.005)
    assert stack[32] == pytest.approx(0.426, abs=0.005)
    floor = sum(flex_densities(MaskSpec(layer_kind(x, 64), 256, 32), 128)[1] for x in range(1, 65)) / 64
    assert floor == pytest.approx(0.395, abs=0.005) and stack[32] < 1.1 * floor


def _dense_in_flex_order(q, k, v, spec):
    """What flex computes, by dense attention: the mask read through flex_order, in that order."""
    order = attention.flex_order(spec)
    pos = order if order is not None else torch.arange(spec.n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed(spec, pos[:, None], pos[None, :]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", [16, 48])
def test_flex_in_its_order_equals_dense_forward_and_backward(kind, block, monkeypatch):
    """The flex path (column-major order for column layers, small blocks) against dense. Forward:
    eager flex on CPU. Backward: CPU flex has none, so the kernel call is replaced by dense
    attention under the same predicate in flex's order: what is checked is the reordering, its
    inverse and the mask read through the order."""
    spec = MaskSpec(kind, 16, 8, conv_kernel=3)  # 80 positions
    q, k, v = (x.detach().float() for x in _qkv(spec, seed=7))
    with torch.no_grad():
        flex = attention.flex_attention(q, k, v, spec, block=block)
        assert torch.allclose(flex, attend(q, k, v, spec, "dense"), atol=1e-5)
    monkeypatch.setattr(attention, "_flex_kernel", lambda qq, kk, vv, bm, blk: _dense_in_flex_order(qq, kk, vv, spec))
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    g = torch.randn_like(q)
    ref, out = attend(q, k, v, spec, "dense"), attention.flex_attention(q, k, v, spec, block=block)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(out, (q, k, v), g), strict=True):
        assert torch.allclose(a, b, atol=1e-12)
