"""An optimizer update that leaves chosen parameters exactly as they were, at every ZeRO stage.

The paper's filter skips the update of a resblock whose gradient overflowed while every other
resblock updates (SPEC §3). At ZeRO stage 0 that is ``p.grad = None``: torch's optimisers pass over
such parameters. Under ZeRO 1-3 DeepSpeed owns the gradients and the fp32 master weights in flat,
partitioned buffers and steps them as a whole, so a parameter cannot be left out of the step. Here
it is put back after it:

1. before the step, the frozen parameters' gradients are set to zero, so that the global gradient
   norm and the clip see only the parameters that update (as ``p.grad = None`` does at stage 0);
2. their fp32 master copies and Adam moments (``exp_avg``, ``exp_avg_sq``) are copied aside;
3. ``engine.step()`` runs;
4. the copies are written back, master and moments through DeepSpeed's public tensor-fragment API
   (``deepspeed.utils.safe_{get,set}_full_*``), the model's own weights (the copy the forward pass
   reads) directly at stages 1-2 and through ``deepspeed.zero.GatheredParameters`` at stage 3.

After it, a frozen parameter, its master copy and its Adam moments are bit-identical to before, and
every other parameter moves exactly as in a run where the frozen ones had no gradient: Adam is
elementwise, so the flat buffers' shared step touches each element on its own. The one thing that
is not per parameter is Adam's step counter: DeepSpeed keeps one per flat group, so it counts the
skipped update for the frozen parameters too, and their next bias correction uses it (at stage 0
torch's counter is per parameter and does not count it). The correction factors differ only in the
first few hundred updates (1 - 0.96^t); the moments themselves are exact.

The copies go to host memory and cost three fp32 copies of the frozen parameters (of this rank's
partition's worth of traffic at stage 3), paid only at an update that skips something, which the
scale rule keeps rare. A whole-update skip (a non-finite loss) freezes every parameter.

Exact in ``precision.mode=block_scaled``, where DeepSpeed's optimizer is the plain one. In
``precision.mode=deepspeed`` at ZeRO 0, DeepSpeed's own fp16/bf16 optimizer wrappers treat a
``None`` gradient as zeros, so a frozen parameter still moves with Adam's momentum and decay there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dalle_repro.train.deepspeed import link_moments

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's whole shape, also at ZeRO 3 where ``p`` itself is an empty placeholder."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _saved(t: torch.Tensor | None, what: str, p: torch.nn.Parameter) -> torch.Tensor:
    if t is None:
        raise RuntimeError(f"DeepSpeed holds no {what} for a parameter of shape {_full_shape(p)}")
    return t.detach().to("cpu", copy=True)


def step_without(engine: Any, frozen: Sequence[torch.nn.Parameter]) -> None:
    """``engine.step()`` at an optimizer boundary, leaving ``frozen`` (with their master copies and
    Adam moments) bit-identical to before and excluded from the gradient norm. Every rank must
    call it with the same parameters in the same order (it gathers and broadcasts them)."""
    stage = int(engine.zero_optimization_stage())
    if not frozen:
        engine.step()
        return
    if stage == 0:
        for p in frozen:
            p.grad = None
        engine.step()
        return
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_grad,
        safe_set_full_optimizer_state,
    )

    # Adam's moments exist once the optimizer has stepped (not at the first update, nor after fp16
    # overflow steps that DeepSpeed counts but skips); every rank has stepped alike
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    has_state = bool(getattr(base, "state", None))
    if has_state and stage < 3:
        link_moments(engine)
    saved = []
    for p in frozen:
        safe_set_full_grad(p, torch.zeros(_full_shape(p), dtype=torch.float32, device=p.device))
        master = _saved(safe_get_full_fp32_param(p), "fp32 master copy", p)
        moments = {k: _saved(safe_get_full_optimizer_state(p, k), k, p) for k in ADAM_STATE} if has_state else {}
        saved.append((p, master, moments))
    engine.step()
    if stage < 3:
        link_moments(engine)  # the moments may have been made by this step
    for p, master, moments in saved:
        dev = torch.device(engine.device)
        safe_set_full_fp32_param(p, master.to(dev))
        for k in ADAM_STATE:
            value = moments[k] if k in moments else torch.zeros_like(master)
            safe_set_full_optimizer_state(p, value.to(dev), k)
        _set_model_weight(p, master, stage)


def _set_model_weight(p: torch.nn.Parameter, master: torch.Tensor, stage: int) -> None:
    """The weight the forward pass reads: every rank's full copy at stages 1-2, a partition at 3."""
    if stage < 3:
        with torch.no_grad():
            p.data.copy_(master.view(p.shape).to(p.dtype))
        return
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        if dist.get_rank() == 0:
            with torch.no_grad():
                p.data.copy_(master.view(p.shape).to(p.dtype))
