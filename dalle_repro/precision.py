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

The branch's parameter gradients carry the factor s_j too. A hook on each parameter divides it
out and filters non-finite values as the gradient is produced, before any optimizer or DeepSpeed
sees it, so the same code works at every ZeRO stage and under gradient accumulation. The hooks
also raise a per-branch flag; :meth:`BlockScaler.end_step` reads the flags (agreed across ranks),
skips the flagged branches' updates (their grads are set to None, which torch's optimisers skip)
while every other branch updates, and applies the scale rule. Scale rule: s_j starts at
M * 2^13 (M = data-parallel ranks); a finite step multiplies it by 2^(1/1000); a non-finite one
divides it by sqrt(2), at most once per 125 updates; s_j stays within [M * 2^7, M * 2^24].
In bf16 there is no scaling (s_j = 1) but the filter and the per-branch skip stay. Parameters
outside the branches (embeddings, heads, the final LayerNorm) get the filter and a flag of their own.

[departure] Under ZeRO stage 1-3, DeepSpeed owns the (partitioned) gradients, so a skipped branch
cannot have its gradient removed: its filtered gradient is zero, and Adam's moments decay for
that step. At stage 0 and without DeepSpeed the skip is exact.

This works with or without DeepSpeed: it is ordinary autograd hooks and a step-time function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as torch_dist

from dalle_repro.config import arg

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class PrecisionArgs:
    """Mixed precision of the prior (SPEC §3)."""

    dtype: Precision = arg("fp32", "Compute precision of the resblocks; the residual stream stays fp32.")
    mode: Literal["paper", "deepspeed"] = arg(
        "paper",
        "paper: fp32 weights and residual stream, half-precision resblocks with per-resblock gradient scaling "
        "(SPEC §3). deepspeed: DeepSpeed's own bf16/fp16 (half weights, one global loss scale), as the peers do.",
    )
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
        self.flags = torch.zeros(n_branches + 1, dtype=torch.bool)  # non-finite seen this step; [n]: the rest
        self._handles: list = []
        self.skipped_total = torch.zeros(n_branches, dtype=torch.long)

    def attach(self, branch_params: Sequence[Sequence[torch.nn.Parameter]], rest: Sequence[torch.nn.Parameter]) -> None:
        """Hook every parameter: branch j's gradients are divided by s_j and filtered; the rest are filtered."""
        if len(branch_params) != self.n:
            raise ValueError(f"expected parameters of {self.n} branches, got {len(branch_params)}")
        for h in self._handles:
            h.remove()
        self._handles = []
        for j, params in enumerate(branch_params):
            for p in params:
                self._handles.append(p.register_hook(lambda g, j=j: self._filter(j, g, float(self.scales[j]))))
        for p in rest:
            self._handles.append(p.register_hook(lambda g: self._filter(self.n, g, 1.0)))

    def _filter(self, j: int, g: torch.Tensor, s: float) -> torch.Tensor:
        """Flag non-finite values in ``g`` (no host sync), zero them and divide by ``s``."""
        bad = ~torch.isfinite(g).all()
        if self.flags.device != g.device:
            self.flags = self.flags.to(g.device)
        self.flags[j] |= bad
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        return g / s if s != 1.0 else g

    def residual(self, j: int, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``x + branch(x)`` with x fp32, the branch under autocast and its gradients scaled and filtered."""
        dtype = autocast_dtype(self.args.dtype)
        half = torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        if not torch.is_grad_enabled():
            with half:
                return x + branch(x).float()
        s = float(self.scales[j])
        inp = x.view_as(x)  # a node of its own, so the hook sees only the gradient leaving the branch
        inp.register_hook(lambda g: self._filter(j, g, s))
        with half:
            out = branch(inp).float()
        out.register_hook(lambda g: g * s)
        return x + out

    @torch.no_grad()
    def end_step(
        self, branch_params: Sequence[Sequence[torch.nn.Parameter]], step: int, drop_grads: bool = True
    ) -> tuple[list[int], bool]:
        """After the backward pass(es) of an update: read the non-finite flags (the maximum over ranks),
        drop the flagged branches' gradients (``drop_grads``; exact skip), update the scales.

        Returns the skipped branch indices and whether the parameters outside the branches saw a
        non-finite gradient (filtered to 0; the caller decides whether to skip the step)."""
        if len(branch_params) != self.n:
            raise ValueError(f"expected parameters of {self.n} branches, got {len(branch_params)}")
        flags = self.flags.to(torch.int32)
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
        bad = flags.cpu().bool().tolist()
        self.flags.zero_()
        skipped = []
        for j, params in enumerate(branch_params):
            if bad[j]:
                skipped.append(j)
                if drop_grads:
                    for p in params:
                        p.grad = None
            self._update(j, not bad[j], step)
        return skipped, bool(bad[self.n])

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
