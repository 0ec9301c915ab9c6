"""The paper's attention masks (SPEC §2), defined once, and the backends that compute with them.

Positions: a sequence is ``text_len`` text tokens followed by ``grid * grid`` image tokens in
raster order. For query position ``q`` and key position ``k`` the mask is:

- text query: causal over text (``k <= q``), never an image key;
- image query: every text key, and the image keys that the layer's kind allows, where ``i``, ``j``
  are the image indices of query and key (``W = grid``):
  - row:    ``i - (W + 1) < j <= i``: itself and the previous W tokens in raster order. Not "the same
    row only", which is what DALLE-pytorch's axial_row computes.
  - column: ``j <= i`` and ``(i - j) mod W == 0``: the same column, this and all earlier rows.
  - conv:   ``j <= i`` and ``j`` inside the ``kernel x kernel`` window centred on ``i``. [?] at the
    edges the window is clamped by default (no wrap); ``wrap=True`` wraps columns around.

Layer ``l`` (1-based, of ``L``) uses conv if ``l == L``, column if ``(l - 2) mod 4 == 0``, else row.

:func:`image_predicate` is the single definition; :func:`dense_mask` (the reference), the CPU
kernel's key lists, the blocked backend's windows, FlexAttention's block mask and the decoding
cache all come from it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dalle_repro.kernels import cpu as cpu_kernels
from dalle_repro.models.masks import MaskSpec, allowed, image_key_lists, image_predicate, reach_rows

# ----------------------------------------------------------------------------------------------
# Backends. Each takes q, k, v of shape (B, H, N, d) and returns (B, H, N, d).

Backend = Literal["dense", "local", "flex"]
BACKENDS: tuple[Backend, ...] = ("dense", "local", "flex")

_DENSE: dict[MaskSpec, torch.Tensor] = {}
_LOCAL: dict[MaskSpec, tuple[torch.Tensor | None, torch.Tensor]] = {}
_LISTS: dict[MaskSpec, torch.Tensor] = {}
_FLEX: dict[tuple[MaskSpec, str, int], object] = {}


def _dense_mask(spec: MaskSpec, device: torch.device) -> torch.Tensor:
    if spec not in _DENSE:
        pos = torch.arange(spec.n)
        _DENSE[spec] = allowed(spec, pos[:, None], pos[None, :])
    return _DENSE[spec].to(device)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, pb_relax: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention over all N^2 pairs with the boolean mask: the reference."""
    mask = _dense_mask(spec, q.device)
    if pb_relax:
        return _masked_attention(q, k[:, :, :0], v[:, :, :0], k, v, mask, pb_relax)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _local_index(spec: MaskSpec, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The local backend's layout, from the predicate: each block's image key indices and mask.

    Row and conv kinds: the image queries of grid row ``y`` form a block that reads the image keys
    of rows ``y - R .. y`` (R = ``reach_rows``). Returns the (rows, (R+1) W) key indices (slots
    above the grid point at key 0 and are masked out) and the (rows, W, text + (R+1) W) mask of
    each block's queries against the text and its window. Column kind: each column is a block
    over its own keys, so no indices, and the (rows, text + rows) mask, causal over the rows.

    Narrower blocks (part of a row, against a window only ``kernel - 1`` wider, for conv) score
    fewer keys, but were slower here: at grid 32, kernel 11, fp32 on 2 CPU threads, blocks of
    16 and 8 queries took 1.15x and 1.3x the time of whole rows, their products being too small.
    """
    if spec not in _LOCAL:
        g = w = spec.grid
        if spec.kind == "column":
            image = torch.ones(g, g, dtype=torch.bool).tril()
            _LOCAL[spec] = (None, torch.cat([torch.ones(g, spec.text_len, dtype=torch.bool), image], 1))
        else:
            rr = reach_rows(spec)
            y = torch.arange(g).view(g, 1, 1)
            ky = y - rr + torch.arange(rr + 1).view(1, -1, 1)  # (rows, R+1, 1)
            inside = (ky >= 0).expand(g, rr + 1, w).flatten(1)  # (rows, (R+1) W)
            key = (ky * w + torch.arange(w)).clamp(min=0).flatten(1)  # (rows, (R+1) W)
            query = y.view(g, 1) * w + torch.arange(w)  # (rows, W)
            image = inside[:, None, :] & image_predicate(spec, query[..., None], key[:, None, :])
            text = torch.ones(g, w, spec.text_len, dtype=torch.bool)
            _LOCAL[spec] = (key, torch.cat([text, image], -1))
    key, mask = _LOCAL[spec]
    return (None if key is None else key.to(device)), mask.to(device)


class _BlockAttention(torch.autograd.Function):
    """softmax(mask(q k^T)) v over [shared text keys, per-block keys], with a hand-written backward.

    Autograd's own backward of the same few ops ran its batched products on sliced, transposed
    operands (the text/image split of the probabilities), at 20-40 GFLOP/s where the same products
    on contiguous operands reach 100-150 on this CPU; here every product's operands are laid out
    for it. Scores and probabilities are float32 (float64 for float64 inputs); products run in the
    inputs' dtype.
    """

    @staticmethod
    def forward(ctx, q, k_text, v_text, k, v, mask, scale, alpha):  # type: ignore[override]
        t, dt = k_text.shape[-2], q.dtype
        acc = torch.promote_types(dt, torch.float32)  # scores and probabilities: float32 or wider
        qs = q * scale
        with torch.autocast(q.device.type, enabled=False):
            s = (qs @ k.transpose(-1, -2)).to(acc)  # (B, H, *blocks, Lq, Lk)
            if t:
                text = (qs.flatten(2, -2) @ k_text.transpose(-1, -2)).view(*q.shape[:-1], t)  # (B, H, *blocks, Lq, T)
                s = torch.cat([text.to(acc), s], -1)
            s.masked_fill_(~mask, float("-inf"))
            if alpha:  # PB-relax: the row maximum off first, then alpha back on
                s = (s - s.amax(-1, keepdim=True)) * alpha
            p = s.softmax(-1)
            p_img = p[..., t:].to(dt).contiguous()
            out = p_img @ v
            if t:
                out += (p[..., :t].to(dt).flatten(2, -2) @ v_text).view_as(out)
        ctx.save_for_backward(qs, k_text, v_text, k, v, p)
        ctx.t, ctx.scale, ctx.alpha = t, scale, alpha
        return out

    @staticmethod
    @once_differentiable  # a clear error, not a silent zero, if anyone asks for a second derivative
    def backward(ctx, d_out):  # type: ignore[override]
        qs, k_text, v_text, k, v, p = ctx.saved_tensors
        t, dt, acc = ctx.t, qs.dtype, p.dtype
        with torch.autocast(qs.device.type, enabled=False):
            d_out = d_out.to(dt).contiguous()
            dp = (d_out @ v.transpose(-1, -2)).to(acc)  # (B, H, *blocks, Lq, Lk)
            if t:
                dp_text = (d_out.flatten(2, -2) @ v_text.transpose(-1, -2)).view(*d_out.shape[:-1], t)
                dp = torch.cat([dp_text.to(acc), dp], -1)
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, acc)  # p (dp - rowsum(p dp)), one pass
            if ctx.alpha:
                ds *= ctx.alpha
            ds_img, p_img = ds[..., t:].to(dt).contiguous(), p[..., t:].to(dt).contiguous()
            dq = ds_img @ k
            dk = ds_img.transpose(-1, -2) @ qs
            dv = p_img.transpose(-1, -2) @ d_out
            dk_text = dv_text = None
            if t:
                ds_text = ds[..., :t].to(dt).flatten(2, -2)  # (B, H, queries, T)
                p_text = p[..., :t].to(dt).flatten(2, -2)
                dq += (ds_text @ k_text).view_as(dq)
                dk_text = ds_text.transpose(-1, -2) @ qs.flatten(2, -2)
                dv_text = p_text.transpose(-1, -2) @ d_out.flatten(2, -2)
            dq *= ctx.scale
        return dq, dk_text, dv_text, dk, dv, None, None, None


def _autocast_inputs(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs in autocast's dtype when autocast is on for their device, as autocast would cast a
    matmul's: the hand-written autograd Functions below turn autocast off inside."""
    device = xs[0].device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dt = torch.get_autocast_dtype(device)
    return tuple(x.to(dt) for x in xs)


def _key_lists(spec: MaskSpec) -> torch.Tensor:
    """(N, K) int32: each position's listed keys for the CPU kernel, as whole-sequence positions.

    Image queries list their image keys (``image_key_lists``); text queries list none, since all
    their keys are text. Empty slots are -1.
    """
    if spec not in _LISTS:
        idx, valid = image_key_lists(spec)
        image = torch.where(valid, idx + spec.text_len, -1)
        text = torch.full((spec.text_len, image.shape[1]), -1, dtype=image.dtype)
        _LISTS[spec] = torch.cat([text, image]).to(torch.int32).contiguous()
    return _LISTS[spec]


def check_kernel_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, text_len: int) -> None:
    """ValueError, naming the operand, unless q, k, v and the key lists are what the C++ kernel may
    read and write: q, k, v CPU floating tensors of one shape (B, H, N, d) and dtype; keys an
    (N, K) int32 tensor of positions in [-1, N); 0 <= text_len <= N. The kernel trusts its pointers
    (a k of another batch or length read and wrote out of bounds), so this runs before any crosses."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.device.type != "cpu" or not x.dtype.is_floating_point or x.dim() != 4:
            raise ValueError(
                f"kernel attention: {name} must be a 4-d floating CPU tensor, "
                f"got {x.dtype} {tuple(x.shape)} on {x.device}"
            )
    if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        shapes = ", ".join(f"{n} {x.dtype} {tuple(x.shape)}" for n, x in (("q", q), ("k", k), ("v", v)))
        raise ValueError(f"kernel attention: q, k and v must share shape and dtype, got {shapes}")
    n = q.shape[2]
    if keys.dtype != torch.int32 or keys.device.type != "cpu" or keys.dim() != 2 or keys.shape[0] != n:
        raise ValueError(
            f"kernel attention: key lists must be ({n}, K) int32 on the CPU, got {keys.dtype} {tuple(keys.shape)}"
        )
    if keys.numel() and (int(keys.min()) < -1 or int(keys.max()) >= n):
        raise ValueError(
            f"kernel attention: key lists hold positions {int(keys.min())}..{int(keys.max())}, outside [-1, {n})"
        )
    if not 0 <= text_len <= n:
        raise ValueError(f"kernel attention: text_len {text_len} outside [0, {n}]")


class _ListAttention(torch.autograd.Function):
    """The whole masked attention on CPU through ``csrc/local_attention.cpp``, forward and backward.

    Text keys: every query's scores against them come from one matrix product, and so do their
    values' share of the output and all their gradients; the kernel only applies the causal limit
    for text queries and folds them into each query's softmax. Image keys: the kernel scores each
    query's listed keys and no others (conv at grid 32: 61, where whole grid rows are 192), and
    accumulates dK and dV per key. Computes in float32 (float64 for float64 inputs) and returns
    the inputs' dtype. ``bench/run.py attention``, grid 32, 64 text tokens, 8 heads x 64, 2 threads,
    forward + backward against dense SDPA: fp32 row 8.1x, column 7.9x, conv 5.7x (blocked products:
    4.2x, 5.1x, 1.7x); bf16 6.0x, 6.4x, 4.5x (blocked: 4.3x, 5.0x, 2.3x).
    """

    @staticmethod
    def forward(ctx, q, k, v, keys, text_len, scale, alpha, lib):  # type: ignore[override]
        check_kernel_operands(q, k, v, keys, text_len)
        dt = q.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32
        with torch.autocast("cpu", enabled=False):
            q, k, v = (x.to(acc).contiguous() for x in (q, k, v))
            b, h, n, d = q.shape
            t = text_len
            qs = q * scale
            text = torch.matmul(qs, k[:, :, :t].transpose(-1, -2))  # (B, H, N, T), becomes probabilities
            p = torch.empty(b, h, n, keys.shape[1], dtype=acc)
            out = torch.empty_like(qs)
            ptr = cpu_kernels.pointer
            fwd = lib.dr_local_forward_f64 if acc == torch.float64 else lib.dr_local_forward_f32
            fwd(b * h, n, d, keys.shape[1], t, ptr(qs), ptr(k), ptr(v), ptr(keys), ptr(text), ptr(p), ptr(out),
                float(alpha or 0.0), torch.get_num_threads())  # fmt: skip
            if t:
                out += text @ v[:, :, :t]
        ctx.save_for_backward(qs, k, v, keys, p, text)
        ctx.scale, ctx.alpha, ctx.t, ctx.lib, ctx.dt = scale, alpha, t, lib, dt
        return out.to(dt)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):  # type: ignore[override]
        qs, k, v, keys, p, p_text = ctx.saved_tensors
        t, acc, lib = ctx.t, qs.dtype, ctx.lib
        with torch.autocast("cpu", enabled=False):
            b, h, n, d = qs.shape
            d_out = d_out.to(acc).contiguous()
            text = torch.matmul(d_out, v[:, :, :t].transpose(-1, -2))  # dO V_text^T, becomes dS_text
            dq = torch.empty_like(qs)
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
            ptr = cpu_kernels.pointer
            bwd = lib.dr_local_backward_f64 if acc == torch.float64 else lib.dr_local_backward_f32
            bwd(b * h, n, d, keys.shape[1], t, ptr(qs), ptr(k), ptr(v), ptr(keys), ptr(p), ptr(p_text), ptr(d_out),
                ptr(text), ptr(dq), ptr(dk), ptr(dv), float(ctx.alpha or 0.0), torch.get_num_threads())  # fmt: skip
            if t:
                dq += text @ k[:, :, :t]
                dk[:, :, :t] += text.transpose(-1, -2) @ qs
                dv[:, :, :t] += p_text.transpose(-1, -2) @ d_out
            dq *= ctx.scale
        dt = ctx.dt
        return dq.to(dt), dk.to(dt), dv.to(dt), None, None, None, None, None


def kernel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, pb_relax: float | None = None
) -> torch.Tensor | None:
    """The local backend through the compiled CPU kernel; None where it does not apply (not on CPU,
    or the kernel is off or could not be built), and the caller takes the blocked-product path."""
    if q.device.type != "cpu" or not q.dtype.is_floating_point:
        return None
    lib = cpu_kernels.load()
    if lib is None:
        return None
    q, k, v = _autocast_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 / (pb_relax or 1.0)
    return _ListAttention.apply(q, k, v, _key_lists(spec), spec.text_len, scale, pb_relax, lib)  # type: ignore[no-any-return]


def _masked_attention(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    pb_relax: float | None = None,
) -> torch.Tensor:
    """softmax over [text keys, own keys] of blocked queries ``q`` (B, H, *blocks, Lq, d).

    ``k_text``, ``v_text`` (B, H, T, d) are shared by every block: their scores and values come
    from one matrix product over all the queries (blocks flattened), never a per-block copy or a
    broadcast batch. ``k``, ``v``: (B, H, *blocks, Lk, d); ``mask`` (*blocks, Lq, T + Lk) covers both.
    Under autocast the inputs are cast to its dtype first, as autocast would cast a matmul's.

    ``pb_relax`` = alpha (CogView's PB-relax): scores are formed from q / alpha, so q.k cannot
    overflow in half precision, shifted by their row maximum, and only then multiplied by alpha.
    The result is the same softmax in exact arithmetic.
    """
    q, k_text, v_text, k, v = _autocast_inputs(q, k_text, v_text, k, v)
    scale = q.shape[-1] ** -0.5 / (pb_relax or 1.0)
    out = _BlockAttention.apply(q, k_text, v_text, k, v, mask, scale, pb_relax)
    return out  # type: ignore[no-any-return]


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, pb_relax: float | None = None
) -> torch.Tensor:
    """Attention that scores only what the mask can reach, with a backward: the CPU training backend.

    On CPU, the compiled kernel (``kernel_attention``) scores exactly each query's listed keys;
    elsewhere, or where the kernel is off or cannot be built, ``blocked_attention`` gives the same
    numbers from blocked matrix products.
    """
    out = kernel_attention(q, k, v, spec, pb_relax)
    return blocked_attention(q, k, v, spec, pb_relax) if out is None else out


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, pb_relax: float | None = None
) -> torch.Tensor:
    """Attention that scores only what the mask can reach, as dense blocks of matrix products.

    Text queries: causal over the text. Image queries of a grid row (row and conv kinds): the text
    and the R rows above plus their own row (R = 1 for row, kernel // 2 for conv), gathered by
    ``_local_index`` and masked by the predicate. Column kind: each column on its own, causal over
    its rows, plus the text. Keys scored per image query at grid 32 with 64 text tokens: row
    64 + 64, conv 11x11 64 + 192, column 64 + 32, against 1088 for dense.
    """
    t, g, w = spec.text_len, spec.grid, spec.grid
    parts = []
    if t and pb_relax:
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        none = k[:, :, :0]
        parts.append(_masked_attention(q[:, :, :t], none, none, k[:, :, :t], v[:, :, :t], causal, pb_relax))
    elif t:
        parts.append(F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], is_causal=True))
    qi, ki, vi = q[:, :, t:], k[:, :, t:], v[:, :, t:]
    kt, vt = k[:, :, :t], v[:, :, :t]
    key, mask = _local_index(spec, q.device)
    if key is None:  # column kind
        qc, kc, vc = (x.unflatten(2, (g, w)).transpose(2, 3) for x in (qi, ki, vi))  # (B, H, W, rows, d)
        out = _masked_attention(qc, kt, vt, kc, vc, mask, pb_relax)  # (B, H, W, rows, d)
        parts.append(out.transpose(2, 3).flatten(2, 3))
    else:

        def window(x: torch.Tensor) -> torch.Tensor:  # (B, H, M, d) -> (B, H, rows, (R+1) W, d)
            return x.index_select(2, key.flatten()).unflatten(2, key.shape)

        out = _masked_attention(qi.unflatten(2, (g, w)), kt, vt, window(ki), window(vi), mask, pb_relax)
        parts.append(out.flatten(2, 3))
    return torch.cat(parts, 2)


# FlexAttention's tile: the block mask's block side, in tokens. 128 is flex's own default and the
# tile its CUDA kernels are tuned for; smaller blocks follow the masks more closely (flex_densities).
FLEX_BLOCK = 128


def flex_order(spec: MaskSpec) -> torch.Tensor | None:
    """The order FlexAttention computes a layer in: for each position of that order, its position
    in the model's (raster) sequence; ``None`` where it is the raster order itself.

    Column layers run on a column-major image order (text first, as always): there a query's keys,
    the same column at this and earlier rows, lie in one run of ``grid`` positions next to it, where
    in raster order they are ``grid`` apart and every key block holds one of them. The mask is the
    same predicate, read through this order, and the output goes back to raster order, so nothing
    outside the attention sees the difference."""
    if spec.kind != "column" or spec.grid == 1:
        return None
    g, t = spec.grid, spec.text_len
    image = torch.arange(g * g).view(g, g).t().reshape(-1)  # column-major: (x, y) -> y * g + x
    return torch.cat([torch.arange(t), image + t])


def flex_block_mask(spec: MaskSpec, device: torch.device | str, block: int = FLEX_BLOCK) -> object:
    """FlexAttention's block mask, in :func:`flex_order`, from the same predicate; cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (spec, str(device), block)
    if key not in _FLEX:
        order = flex_order(spec)
        pos = (order if order is not None else torch.arange(spec.n)).to(device)

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return allowed(spec, pos[q_idx], pos[kv_idx])

        _FLEX[key] = create_block_mask(mask_mod, None, None, spec.n, spec.n, device=str(device), BLOCK_SIZE=block)
    return _FLEX[key]


def flex_densities(spec: MaskSpec, block: int = FLEX_BLOCK) -> tuple[float, float]:
    """(block density, element density) of a layer's mask, both as fractions of causal attention:
    key blocks FlexAttention visits over the blocks a causal mask visits at the same block size, and
    allowed pairs over N (N + 1) / 2. Read off the block mask itself (CPU; no CUDA needed)."""
    blocks = flex_block_mask(spec, "cpu", block).to_dense()[0, 0].bool()  # (N / block, N / block)
    n = blocks.shape[0]
    causal = n * (n + 1) // 2  # blocks on or below the diagonal, in raster and column-major order alike
    pos = torch.arange(spec.n)
    elements = int(allowed(spec, pos[:, None], pos[None, :]).sum())
    return int(blocks.sum()) / causal, elements / (spec.n * (spec.n + 1) / 2)


_FLEX_FN: dict[str, object] = {}


def _flex_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: object, block: int) -> torch.Tensor:
    """flex_attention itself: compiled on CUDA, with tiles that divide ``block``; eager on CPU."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cuda":
        fn = _FLEX_FN.setdefault("cuda", torch.compile(flex, dynamic=False))
        options = None
        if block < 128:  # the kernel's tiles must divide the block mask's blocks
            options = {k: block for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}
        return fn(q, k, v, block_mask=block_mask, kernel_options=options)  # type: ignore[operator]
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise RuntimeError("FlexAttention has no backward on CPU: use attention backend 'local' to train on CPU")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex(q, k, v, block_mask=block_mask)


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    pb_relax: float | None = None,
    block: int = FLEX_BLOCK,
) -> torch.Tensor:
    """FlexAttention with a block-sparse mask (compiled on CUDA; eager, and without backward, on CPU),
    computed in :func:`flex_order` and returned in raster order.

    ``pb_relax`` changes nothing here, and is ignored: PB-relax divides the scores by alpha so that a
    half-precision score matrix cannot overflow before the max is subtracted; flex forms its scores
    in fp32 and subtracts the running max itself, so there is no half-precision score to protect (a
    ``score_mod`` multiplying alpha back in, as before, was the identity plus a rounding).

    Eager FlexAttention materialises the full score matrix, so on CPU it checks correctness but is
    not the fast path: ``auto`` picks ``local`` there.
    """
    order = flex_order(spec)
    if order is not None:
        order = order.to(q.device)
        q, k, v = (x.index_select(2, order) for x in (q, k, v))  # (B, H, N, d) in column-major image order
    out = _flex_kernel(q, k, v, flex_block_mask(spec, q.device, block), block)
    if order is not None:
        out = out.index_select(2, torch.argsort(order))  # back to raster order
    return out


def pick_backend(name: str, device: torch.device, training: bool) -> Backend:
    """``auto``: flex (compiled, block-sparse) on CUDA; local on CPU, in training and inference alike,
    because eager FlexAttention on CPU scores every pair (``training`` is kept for the day it differs)."""
    if name in BACKENDS:
        return name  # type: ignore[return-value]
    if name != "auto":
        raise ValueError(f"attention backend must be auto or one of {BACKENDS}, got {name!r}")
    return "flex" if device.type == "cuda" else "local"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    backend: Backend,
    pb_relax: float | None = None,
    flex_block: int = FLEX_BLOCK,
) -> torch.Tensor:
    """Masked attention of (B, H, N, d) tensors with the named backend (PB-relax with alpha if given;
    ``flex_block``: the flex backend's block side)."""
    if q.shape[2] != spec.n:
        raise ValueError(f"expected {spec.n} positions for text {spec.text_len} + grid {spec.grid}^2, got {q.shape[2]}")
    if backend == "flex":
        return flex_attention(q, k, v, spec, pb_relax, flex_block)
    fn = {"dense": dense_attention, "local": local_attention}[backend]
    return fn(q, k, v, spec, pb_relax)
