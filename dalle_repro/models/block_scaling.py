"""The paper's per-resblock gradient scaling (SPEC.md): each residual branch's gradient carries its own
scale, and a branch whose gradient is not finite skips its update instead of poisoning the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as torch_dist

from dalle_repro.core.precision import PrecisionArgs, autocast_dtype


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
    - Why not the simple filter: an ``isfinite`` pass writing a bool tensor of every gradient's
      size (some 20x a ``sum`` on a CPU), an ``all``, a ``nan_to_num`` copy and a multiply by
      s = 1 on each branch output cost about 48 ms of a 0.55 s backward of the demo prior's shape
      (fp32, one thread), against about 4 ms for the above.
    """

    def __init__(self, n_branches: int, args: PrecisionArgs):
        self.args = args
        self.n = n_branches
        self.scaled = args.dtype == "fp16"
        self.lo, self.hi = 2**args.min_log2, 2**args.max_log2
        init = 2**args.init_log2 if self.scaled else 1.0
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
        inp = x
        if x.requires_grad:  # not below frozen layers (fine-tuning's init.freeze): no gradient leaves there
            inp = x.view_as(x)  # a node of its own, so the hook sees only the gradient leaving the branch
            inp.register_hook(lambda g: self._filter(j, g, s))
        with half:
            out = branch(inp).float()
        if s != 1.0 and out.requires_grad:
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
