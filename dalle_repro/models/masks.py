"""The paper's attention masks, defined once: a predicate over query and key positions.

Text attends causally to text; image tokens attend to all text and, by layer kind, to earlier image
tokens in their row, their column, or a convolutional neighbourhood (SPEC.md). The dense mask, the
per-query key lists of the CPU kernel, the flex block mask and the KV cache's reach all derive from
:func:`allowed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["row", "column", "conv"]
KINDS: tuple[Kind, ...] = ("row", "column", "conv")


@dataclass(frozen=True)
class MaskSpec:
    """One layer's mask: its kind, the sequence shape and the conv options."""

    kind: Kind
    text_len: int
    grid: int
    conv_kernel: int = 11
    wrap: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mask kind must be one of {KINDS}, got {self.kind!r}")
        if self.text_len < 0 or self.grid < 1:
            raise ValueError(f"need text_len >= 0 and grid >= 1, got {self.text_len}, {self.grid}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd and >= 1, got {self.conv_kernel}")

    @property
    def n_image(self) -> int:
        return self.grid * self.grid

    @property
    def n(self) -> int:
        return self.text_len + self.n_image


def layer_kind(layer: int, n_layers: int) -> Kind:
    """The paper's schedule, 1-based ``layer`` of ``n_layers``: conv last, column where (l-2) % 4 == 0."""
    if not 1 <= layer <= n_layers:
        raise ValueError(f"layer must be in 1..{n_layers}, got {layer}")
    if layer == n_layers:
        return "conv"
    return "column" if (layer - 2) % 4 == 0 else "row"


def image_predicate(spec: MaskSpec, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Whether image query ``i`` may attend image key ``j`` (broadcasting int tensors)."""
    w = spec.grid
    causal = j <= i
    if spec.kind == "row":
        return causal & (j > i - (w + 1))
    if spec.kind == "column":
        return causal & ((i - j) % w == 0)
    r = spec.conv_kernel // 2
    qy, qx, ky, kx = i // w, i % w, j // w, j % w
    dx = kx - qx
    if spec.wrap:
        dx = (dx + r) % w - r  # the column distance going round the nearer way
    return causal & ((ky - qy).abs() <= r) & (dx.abs() <= r)


def allowed(spec: MaskSpec, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether query position ``q`` may attend key position ``k`` (whole-sequence positions)."""
    t = spec.text_len
    q_img, k_img = q >= t, k >= t
    text_part = ~q_img & ~k_img & (k <= q)
    image_part = q_img & (~k_img | image_predicate(spec, q - t, k - t))
    return text_part | image_part


def dense_mask(kind: Kind, text_len: int, grid: int, **options: object) -> torch.Tensor:
    """(N, N) bool, True where query i may attend key j; N = text_len + grid**2. The reference."""
    spec = MaskSpec(kind, text_len, grid, **options)  # type: ignore[arg-type]
    pos = torch.arange(spec.n)
    return allowed(spec, pos[:, None], pos[None, :])


def image_key_lists(spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image query, its allowed image keys: (n_image, K) indices and a (n_image, K) validity mask.

    K is the most keys any query has (row: W + 1; column: grid; conv: the causal half-window).
    Padding entries point at key 0 and are marked invalid.
    """
    n = spec.n_image
    i = torch.arange(n)[:, None]
    if spec.kind == "row":
        cand = i - torch.arange(spec.grid + 1)[None, :]
    elif spec.kind == "column":
        cand = i - spec.grid * torch.arange(spec.grid)[None, :]
    else:
        r, w = spec.conv_kernel // 2, spec.grid
        dy = torch.arange(-r, 1)[:, None].expand(r + 1, 2 * r + 1).flatten()
        dx = torch.arange(-r, r + 1)[None, :].expand(r + 1, 2 * r + 1).flatten()
        qy, qx = i // w, i % w
        ky, kx = qy + dy[None, :], qx + dx[None, :]
        if spec.wrap:
            kx = kx % w
        inside = (ky >= 0) & (kx >= 0) & (kx < w)
        cand = torch.where(inside, ky * w + kx, -1)
    valid = (cand >= 0) & (cand < n)
    cand = cand.clamp(0, n - 1)
    valid &= image_predicate(spec, i.expand_as(cand), cand)
    # drop duplicate entries (a wrapped window narrower than the kernel repeats columns)
    sorted_c, order = torch.sort(torch.where(valid, cand, n + torch.arange(cand.shape[1])), dim=1)
    dup = torch.zeros_like(valid)
    dup[:, 1:] = sorted_c[:, 1:] == sorted_c[:, :-1]
    valid = torch.gather(valid, 1, order) & ~dup
    cand = torch.gather(cand, 1, order)
    keep = valid.any(0)
    return cand[:, keep], valid[:, keep]


def reach_rows(spec: MaskSpec) -> int:
    """How many grid rows above its own an image query can see (row and conv kinds)."""
    if spec.kind == "row":
        return min(1, spec.grid - 1)
    return min(spec.conv_kernel // 2, spec.grid - 1)
