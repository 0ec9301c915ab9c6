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
In bf16 and fp32 there is no scaling (s_j = 1) but the filter and the per-branch skip stay: there
they catch a NaN or inf from bad data or a diverging run rather than an fp16 overflow. Parameters
outside the branches (embeddings, heads, the final LayerNorm) get the filter and a flag of their own.

The filter costs what it must: where a gradient is finite (nearly always) a hook reads it once
(one reduction) and, with s_j = 1 on a CPU, hands it back as it is; only a non-finite gradient
is copied with its non-finite values zeroed. :class:`BlockScaler` lists the cost of each mode.

[departure] Under ZeRO stage 1-3, DeepSpeed owns the (partitioned) gradients, so a skipped branch
cannot have its gradient removed: its gradient, with the non-finite values zeroed, still reaches
the optimizer, and Adam's moments move for that step. At stage 0 and without DeepSpeed the skip
is exact.

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
    """Per-branch gradient scales, the hooks that apply them, and the step-time unscale and skip.

    What the filter is for. The paper's filter exists because fp16 gradients overflow: a scale
    large enough to keep small gradients from underflowing sends some block's gradient to inf now
    and then, and the filter turns that into "skip this block's update, lower its scale" instead of
    a lost step or a poisoned loss scale. In fp32 and bf16 there is no scale (s = 1), so nothing
    overflows because of it; what the filter must still do there is catch a NaN or inf from bad data
    or a diverging run, so that the branch that produced it skips its update and its non-finite
    values reach neither the residual gradient of the blocks below nor the optimizer. That needs a
    per-gradient "is anything non-finite?" and, only when the answer is yes, the zeroing.

    What each mode costs, per gradient (every parameter's, and each one leaving a branch):

    - s = 1 (fp32, bf16), on CPU: one read-only reduction, ``g.sum()``, whose
      result is non-finite where an element is (or where the sum overflowed: then an exact
      ``isfinite`` pass decides), and a host check, free on a CPU. A finite gradient is handed back
      as it is: no copy, no allocation. No hook multiplies the branch output's gradient by 1.
    - s != 1 (fp16), on CPU: the same reduction, and the division by s (a new tensor, which the
      unscale needs anyway); the zeroing, in place on that tensor, only when something is non-finite.
    - On CUDA, with no host sync: ``aminmax`` (one read pass) raises the flag on the device, and
      ``nan_to_num`` runs on every gradient (one pass; in place after the division when s != 1).
    - Before, every gradient in every mode paid an ``isfinite`` pass writing a bool tensor of its
      size (the slow part on a CPU: some 20x a ``sum``), an ``all``, a ``nan_to_num`` copy, and a
      multiply by s = 1 on each branch output. A profile of one demo-prior rank (fp32) put 14% of
      its time in the filter; a rough micro-benchmark (the demo prior's shape, fp32, one thread,
      a shared machine) timed the filter at about 48 ms of a 0.55 s backward before, 4 ms after.
    """

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
        """Flag non-finite values in ``g`` (branch ``j``; ``n``: the rest), zero them and divide by ``s``.

        On a CPU a finite ``g`` with ``s == 1`` comes back as the same tensor. ``g`` itself is never
        modified (autograd may hand the same tensor to other consumers)."""
        if g.device.type == "cpu":
            if _all_finite(g):
                return g / s if s != 1.0 else g
            self.flags[j] = True
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # a copy of our own
            return g.div_(s) if s != 1.0 else g
        if g.numel():  # no host sync: the flag stays on the device until end_step reads it
            lo, hi = torch.aminmax(g)  # NaN where any element is NaN, +-inf where one is
            if self.flags.device != g.device:
                self.flags = self.flags.to(g.device)
            self.flags[j] |= ~(torch.isfinite(lo) & torch.isfinite(hi))
        if s != 1.0:
            return (g / s).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

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
        if s != 1.0:
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


def _all_finite(g: torch.Tensor) -> bool:
    """Whether every element of a CPU tensor is finite: a sum is finite unless an element is not or
    the sum overflows; only then (rarely) does an exact, slower ``isfinite`` pass decide."""
    return math.isfinite(g.sum().item()) or bool(torch.isfinite(g).all())
