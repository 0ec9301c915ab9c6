"""Optimisers, schedules and the EMA of weights, shared by the dVAE and the prior.

The paper's schedules are cosine anneals that then hold their end value:
``v(t) = v_end + (v_start - v_end) * (1 + cos(pi * min(t, T) / T)) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dalle_repro.core.pretrained import load_state_strict


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """The paper's cosine anneal from ``start`` to ``end`` over ``steps``, then ``end``."""
    if steps <= 0:
        return end
    t = min(step, steps) / steps
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights (tensors of 2+ dims) only, not on biases, gains or embeddings' 1-d kin."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(
    model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.AdamW:
    """torch AdamW on the model's parameters, with the fused kernel (one pass over each tensor).

    On CPU the fused kernel took 0.84 ms per step on the vae_train dVAE where foreach took 3.2 ms
    (86 tensors, 0.87M parameters). It pairs a parameter's elements with its state's by raw
    memory order, so state loaded from a checkpoint must be given the parameter's layout again:
    ``load_optimizer_state`` does that (a channels_last conv weight with contiguous state updated
    the wrong elements, which the exact-resume test caught).
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)``, then each per-parameter state tensor in its parameter's
    memory layout (checkpoints store tensors contiguous; parameters may be channels_last)."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class EMA:
    """An exponential moving average of parameters, kept in fp32: ``ema = d * ema + (1 - d) * p``.

    The decay warms up as ``min(decay, (1 + t) / (10 + t))`` at update ``t``, so that a short run's
    average is not dominated by the random initial weights (0.999^2000 still weighs them 13%).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        floats, shadows = [], []
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                floats.append(v.detach().float())
                shadows.append(self.shadow[k])
            else:
                self.shadow[k].copy_(v)
        torch._foreach_lerp_(shadows, floats, 1 - d)  # s += (1 - d)(v - s): one fused pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {k: state[k].float().clone() for k in self.shadow}

    def params(self, like: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The averaged tensors, as a state dict to load into a copy of the model."""
        return {k: v for k, v in self.shadow.items() if like is None or k in like}


class ModuleState:
    """A model as a registered stateful object (train/loop.py): its weights, loaded strictly, with
    an error naming the missing or unexpected keys."""

    def __init__(self, module: torch.nn.Module, label: str = "checkpoint") -> None:
        self.module, self.label = module, label

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_state_strict(self.module, state, self.label)


class OptimizerState:
    """An optimizer as a registered stateful object, loaded through :func:`load_optimizer_state`
    (the per-parameter state back in its parameter's memory layout)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.opt, state)
