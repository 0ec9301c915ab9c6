"""The KV cache for sampling: per layer, only the keys a later query can still reach."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle_repro.models.masks import MaskSpec, image_key_lists

# ----------------------------------------------------------------------------------------------
# Cached decoding: one new token at a time, keeping only the keys the mask can still reach.


def cache_capacity(spec: MaskSpec) -> int:
    """Image keys a layer must keep: one more than the farthest look-back of any query.

    Row: W + 1. Conv (kernel 2r + 1): r W + r + 1. Column: (grid - 1) W + 1, every column's history.
    """
    idx, valid = image_key_lists(spec)
    i = torch.arange(spec.n_image)[:, None]
    return int(torch.where(valid, i - idx, 0).max().item()) + 1


class LayerCache:
    """Keys and values of one layer for decoding: all text positions and a ring of image positions.

    A ring of ``cache_capacity(spec)`` slots is enough: a key that a later query can reach is never
    more than that many image positions back, so its slot is not yet reused.
    """

    def __init__(self, spec: MaskSpec, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.capacity = cache_capacity(spec)
        t = spec.text_len
        # one buffer per layer: the text's keys in [0, t), the image ring after them, so that each
        # step gathers its keys with one index_select (no concatenation)
        shape = (batch, heads, t + self.capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.has_text = False
        idx, valid = image_key_lists(spec)
        text = torch.arange(t)
        self._keys = [torch.cat([text, t + idx[i][valid[i]] % self.capacity]).to(device) for i in range(spec.n_image)]

    def text(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """All text positions at once (causal); they are kept whole."""
        t = self.spec.text_len
        self.k[:, :, :t] = k
        self.v[:, :, :t] = v
        self.has_text = True
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """Image position ``i`` (q, k, v of shape (B, H, 1, d)): store it, attend text + reachable keys."""
        if not self.has_text:
            raise RuntimeError("decode the text before the image")
        slot = self.spec.text_len + i % self.capacity
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        keys = self._keys[i]
        # every kept key is allowed: no mask
        return F.scaled_dot_product_attention(q, self.k.index_select(2, keys), self.v.index_select(2, keys))

    def keep_rows(self, index: torch.Tensor) -> None:
        """Select batch rows (e.g. to drop finished candidates)."""
        self.k, self.v = self.k[index], self.v[index]
