"""The paper's mixed precision (SPEC §3): fp32 residual stream, half-precision resblocks, and
per-resblock gradient scaling with a non-finite filter.

Each residual branch (a block's attention and its MLP: each is a "resblock" here) runs under
autocast in fp16 or bf16 while the residual stream, the parameters (gains, biases, embeddings)
and the logits stay fp32. In the backward pass, for branch j with scale s_j:

1. the gradient arriving at the branch output is multiplied by s_j (so that small fp16 gradients
   do not underflow inside the branch);
2. the branch's backward runs in half precision;
3. non-finite values in the gradient leaving the branch are replaced by 0 (the filter), and it is
   divided by s_j before it joins the fp32 residual gradient.

The branch's parameter gradients carry the factor s_j; :meth:`BlockScaler.unscale_` divides it
out, and a branch whose gradients are not all finite has its update skipped (its grads are set to
None, which torch's optimisers skip) while every other branch updates. Scale rule: s_j starts at
M * 2^13 (M = data-parallel ranks); a finite step multiplies it by 2^(1/1000); a non-finite one
divides it by sqrt(2), at most once per 125 updates; s_j stays within [M * 2^7, M * 2^24].
In bf16 there is no scaling (s_j = 1) but the filter and the per-branch skip stay.

This works with or without DeepSpeed: it is ordinary autograd hooks and a step-time function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dalle_repro.config import arg

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class PrecisionArgs:
    """Mixed precision of the prior (SPEC §3)."""

    dtype: Precision = arg("fp32", "Compute precision of the resblocks; the residual stream stays fp32.")
    init_log2: float = arg(13.0, "log2 of each branch's initial gradient scale, before x M ranks.")
    min_log2: float = arg(7.0, "log2 of the smallest scale, before x M.")
    max_log2: float = arg(24.0, "log2 of the largest scale, before x M.")
    growth_steps: int = arg(1000, "A finite step multiplies the scale by 2^(1/growth_steps).", gt=0)
    decay_every: int = arg(125, "A scale drops (by sqrt 2) at most once per this many updates.", gt=0)


def autocast_dtype(dtype: Precision) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


class BlockScaler:
    """Per-branch gradient scales, the hooks that apply them, and the step-time unscale and skip."""

    def __init__(self, n_branches: int, args: PrecisionArgs, world_size: int = 1):
        self.args = args
        self.n = n_branches
        self.scaled = args.dtype == "fp16"
        m = float(world_size)
        self.lo, self.hi = m * 2**args.min_log2, m * 2**args.max_log2
        init = m * 2**args.init_log2 if self.scaled else 1.0
        self.scales = torch.full((n_branches,), init, dtype=torch.float64)
        self.last_decay = torch.full((n_branches,), -(10**9), dtype=torch.long)
        self.nonfinite = torch.zeros(n_branches, dtype=torch.bool)  # seen by the filter this step
        self.skipped_total = torch.zeros(n_branches, dtype=torch.long)

    def residual(self, j: int, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``x + branch(x)`` with x fp32, the branch under autocast and its gradients scaled and filtered."""
        dtype = autocast_dtype(self.args.dtype)
        half = torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        if not torch.is_grad_enabled():
            with half:
                return x + branch(x).float()
        s = float(self.scales[j])
        inp = x.view_as(x)  # a node of its own, so the hook sees only the gradient leaving the branch

        def leaving(g: torch.Tensor) -> torch.Tensor:
            finite = torch.isfinite(g)
            if not bool(finite.all()):
                self.nonfinite[j] = True
                g = torch.where(finite, g, torch.zeros_like(g))
            return g / s

        inp.register_hook(leaving)
        with half:
            out = branch(inp).float()
        out.register_hook(lambda g: g * s)
        return x + out

    @torch.no_grad()
    def unscale_(self, branch_params: Sequence[Sequence[torch.nn.Parameter]], step: int) -> list[int]:
        """Divide each branch's gradients by its scale; skip (grad None) and count branches with
        non-finite gradients; update the scales. Returns the skipped branch indices."""
        if len(branch_params) != self.n:
            raise ValueError(f"expected parameters of {self.n} branches, got {len(branch_params)}")
        skipped = []
        for j, params in enumerate(branch_params):
            s = float(self.scales[j])
            finite = not bool(self.nonfinite[j])
            for p in params:
                if p.grad is not None:
                    if s != 1.0:
                        p.grad.div_(s)
                    finite = finite and bool(torch.isfinite(p.grad).all())
            if not finite:
                for p in params:
                    p.grad = None
                skipped.append(j)
            self._update(j, finite, step)
        self.nonfinite.zero_()
        return skipped

    def _update(self, j: int, finite: bool, step: int) -> None:
        if not finite:
            self.skipped_total[j] += 1
        if not self.scaled:
            return
        if finite:
            self.scales[j] *= 2 ** (1 / self.args.growth_steps)
        elif step - int(self.last_decay[j]) >= self.args.decay_every:
            self.scales[j] /= math.sqrt(2)
            self.last_decay[j] = step
        self.scales[j] = min(max(float(self.scales[j]), self.lo), self.hi)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "scales": self.scales.clone(),
            "last_decay": self.last_decay.clone(),
            "skipped": self.skipped_total.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["scales"].shape != self.scales.shape:
            raise ValueError(f"scaler state has {state['scales'].numel()} branches, the model {self.n}")
        self.scales = state["scales"].clone().double()
        self.last_decay = state["last_decay"].clone().long()
        self.skipped_total = state["skipped"].clone().long()
