"""DeepSpeed behind one door: the engine's config generated from ours, the client optimizer, the engine
set up for pickle-free checkpoints, gathering ZeRO-3's weights, and every private name of DeepSpeed
this project touches (PRIVATE_NAMES, checked by tests/test_deepspeed_adapter.py against the
installed version; pyproject pins the range they were checked on). No other module uses a DeepSpeed
private.

DeepSpeed's checkpoint files without pickle: a checkpoint engine that writes safetensors.

DeepSpeed saves its part of a checkpoint (module states, optimizer partitions, its counters) through
a pluggable *checkpoint engine*. The stock one calls ``torch.save`` and, on resume,
``torch.load`` with ``weights_only`` off, which unpickles: a checkpoint folder from anywhere else could
run code on ``--resume``. :class:`SafeCheckpointEngine` replaces it. Each state dict becomes one
safetensors file (at the path DeepSpeed asks for, so its file layout and names are unchanged): the
tensors as tensors, everything else as a JSON skeleton in the file's metadata
(:func:`dalle_repro.train.checkpoint.flatten_state`). Loading reads that file and nothing else. A file
that is not ours (a pickle from the stock engine, a truncated write) is refused with an error that
names it; nothing in it is executed.

Beyond JSON's types, DeepSpeed's states hold ``torch.Size`` shapes, enum members and its loss-scaler
objects; they are stored by value and rebuilt only from an allow-list of DeepSpeed's own classes.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dalle_repro.core import distributed
from dalle_repro.core.config import ConfigError, deep_merge
from dalle_repro.core.files import honour_umask
from dalle_repro.train.checkpoint import flatten_state, unflatten_state
from dalle_repro.train.optim import param_groups
from dalle_repro.train.prior_config import PriorTrainConfig

FORMAT = "dalle-repro/deepspeed-state/1"

# Classes whose instances DeepSpeed puts into its states, rebuilt from their attributes on load.
# Nothing outside this list is ever imported or constructed from a checkpoint.
ALLOWED_OBJECTS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def _name(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _encode(x: Any) -> Any:
    """Replace the few non-JSON, non-tensor values DeepSpeed saves by tagged plain values."""
    if isinstance(x, torch.Size):
        return {"__size__": list(x)}
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"__device__": str(x)}
    if isinstance(x, enum.Enum):
        if _name(x) not in ALLOWED_OBJECTS:
            raise TypeError(f"cannot store enum {_name(x)} in a checkpoint (not in ALLOWED_OBJECTS)")
        return {"__enum__": _name(x), "value": x.value}
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_encode(v) for v in x)
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if _name(x) in ALLOWED_OBJECTS:
        return {"__object__": _name(x), "attrs": _encode(dict(vars(x)))}
    raise TypeError(f"cannot store {_name(x)} in a checkpoint (not in ALLOWED_OBJECTS)")


def _class(name: str) -> type:
    if name not in ALLOWED_OBJECTS:
        raise ValueError(f"checkpoint names class {name!r}, which is not in the allow-list; refusing to build it")
    module, _, qual = name.rpartition(".")
    return getattr(importlib.import_module(module), qual)


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if "__size__" in x and len(x) == 1:
            return torch.Size(x["__size__"])
        if "__dtype__" in x and len(x) == 1:
            dtype = getattr(torch, x["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"checkpoint names an unknown dtype {x['__dtype__']!r}")
            return dtype
        if "__device__" in x and len(x) == 1:
            return torch.device(x["__device__"])
        if "__enum__" in x:
            return _class(x["__enum__"])(x["value"])
        if "__object__" in x:
            obj = object.__new__(_class(x["__object__"]))
            obj.__dict__.update(_decode(x["attrs"]))
            return obj
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_decode(v) for v in x)
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (views of one buffer): copy those."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[k] = t
    return out


def save_state(state: Any, path: str | Path) -> None:
    """One state dict as one safetensors file, written atomically."""
    skeleton, tensors = flatten_state(_encode(state))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(_unshared(tensors), str(tmp), metadata={"format": FORMAT, "skeleton": json.dumps(skeleton)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        honour_umask(tmp)  # safetensors writes its files 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(path: str | Path, map_location: Any = None) -> Any:
    """A state written by :func:`save_state`; anything else raises ValueError naming the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is a safetensors file but not a dalle-repro DeepSpeed state")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except (SafetensorError, OSError) as e:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found") from None
        raise ValueError(
            f"{path} is not a safetensors DeepSpeed state ({e}); it may be a pickle written by DeepSpeed's "
            "stock engine or a truncated file. dalle-repro never unpickles checkpoints; this run cannot resume from it."
        ) from None
    if isinstance(map_location, (str, torch.device)):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return _decode(unflatten_state(json.loads(meta["skeleton"]), tensors))


ENGINE_NAME = "dalle-repro safetensors"


def is_safe_engine(engine: Any) -> bool:
    """Whether ``engine`` is the one :func:`safe_checkpoint_engine` made (its class is local to it)."""
    return type(engine).__name__ == "SafeCheckpointEngine" and getattr(engine, "name", None) == ENGINE_NAME


def safe_checkpoint_engine() -> Any:
    """An instance of DeepSpeed's CheckpointEngine interface backed by :func:`save_state` / :func:`load_state`."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafeCheckpointEngine(CheckpointEngine):
        def __init__(self) -> None:
            super().__init__(None)
            self.name = ENGINE_NAME

        def create(self, info: Any) -> None:
            pass

        def save(self, state_dict: Any, path: str) -> None:
            save_state(state_dict, path)

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_state(path, map_location)

        def commit(self, info: Any) -> bool:
            return True

    return SafeCheckpointEngine()


# The DeepSpeed private names used here, each (where, name, why). A DeepSpeed upgrade that removes one
# fails tests/test_deepspeed_adapter.py with the name.
PRIVATE_NAMES = (
    (
        "deepspeed.runtime.engine.DeepSpeedEngine",
        "_copy_recovery_script",
        "it copies zero_to_fp32.py (which torch.loads pickles) beside ZeRO checkpoints; turned off",
    ),
    (
        "deepspeed.runtime.engine.DeepSpeedEngine",
        "_config",
        "the engine's parsed config: gradient_clipping is switched off for an update that steps no parameter",
    ),
    (
        "deepspeed.runtime.config.DeepSpeedConfig",
        "gradient_clipping",
        "read and restored around that update",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_hp_optimizer_states_linked",
        "reset so that every parameter group gets its moment views (link_moments)",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_lazy_init_hp_params_optimizer_state",
        "links them again (link_moments)",
    ),
)


# Top-level keys of a DeepSpeed config that change how checkpoints are read or written: "checkpoint"
# (load_universal reaches torch.load(weights_only=False) past any checkpoint engine; writer engines),
# "datastates_ckpt" (another engine), "nebula" (removed from DeepSpeed, refused all the same).
READ_PATH_KEYS = frozenset({"checkpoint", "datastates_ckpt", "nebula"})


def check_safe_loading(engine: Any) -> None:
    """Before ``load_checkpoint``: the engine reads through our safetensors engine and no universal
    checkpoint path (which unpickles whatever file it is given). A RuntimeError otherwise."""
    if not is_safe_engine(engine.checkpoint_engine):
        raise RuntimeError(f"DeepSpeed's checkpoint engine is {type(engine.checkpoint_engine).__name__}, not ours")
    if engine.load_universal_checkpoint():
        raise RuntimeError("DeepSpeed is set to load a universal checkpoint, which unpickles; refusing to resume")


def deepspeed_config(cfg: PriorTrainConfig, world_size: int) -> dict[str, Any]:
    """The engine's config, generated from ours, with the user's JSON (``deepspeed.config``) merged over it.
    ``cfg.precision.dtype`` must be resolved already (``auto`` is picked in :func:`picked_precision`)."""
    if cfg.precision.dtype == "auto":
        raise ValueError("deepspeed_config: precision.dtype 'auto' must be picked first (picked_precision)")
    b, gas = cfg.data.batch_size, cfg.deepspeed.grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": b,
        "gradient_accumulation_steps": gas,
        "train_batch_size": b * gas * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": cfg.precision.mode == "deepspeed" and cfg.precision.dtype == "bf16"},
        "fp16": {"enabled": cfg.precision.mode == "deepspeed" and cfg.precision.dtype == "fp16"},
    }
    if ds["fp16"]["enabled"]:
        ds["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2)
    if cfg.optim.impl == "deepspeed":
        o = cfg.optim
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.schedule.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
            },
        }
    if cfg.deepspeed.config:
        path = Path(cfg.deepspeed.config)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"deepspeed.config: cannot read {path} as JSON: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed.config: {path} must hold a JSON object")
        refused = sorted(READ_PATH_KEYS & set(user))
        if refused:
            raise ConfigError(
                f"deepspeed.config: {path} sets {', '.join(refused)}, which change how DeepSpeed reads and writes "
                "checkpoints (universal checkpoints, other engines: paths that unpickle); this trainer's checkpoints "
                "go through its own engine, which never unpickles. Remove the key."
            )
        ds = deep_merge(ds, user)
        micro = ds.get("train_micro_batch_size_per_gpu")
        if micro != b:
            raise ConfigError(
                f"deepspeed.config: {path} sets train_micro_batch_size_per_gpu={micro}; "
                f"set data.batch_size={micro} instead (the loader reads it)"
            )
        gas = ds.get("gradient_accumulation_steps", gas)
        ds["train_batch_size"] = b * gas * world_size
    return ds


def client_optimizer(model: torch.nn.Module, cfg: PriorTrainConfig) -> torch.optim.Optimizer | None:
    """The optimizer the engine wraps (``optim.impl``): torch's AdamW (fused on CUDA), apex's FusedAdam,
    or None for DeepSpeed's own (made by ``initialize`` from the config's ``optimizer`` section)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.impl == "deepspeed":
        return None
    if o.impl == "apex":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("optim.impl: apex is not installed; use torch or deepspeed") from None
        return FusedAdam(groups, lr=cfg.schedule.lr, betas=(o.beta1, o.beta2), eps=o.eps, adam_w_mode=True)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.schedule.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def initialize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_parameters: Any,
    lr_scheduler: Callable[[torch.optim.Optimizer], Any],
    config: dict[str, Any],
) -> Any:
    """``deepspeed.initialize`` with this project's checkpoint engine (no pickle in DeepSpeed's files)
    and without the recovery script DeepSpeed copies beside ZeRO checkpoints: zero_to_fp32.py
    torch.loads pickles, so it cannot read these files (RUN/export holds the consolidated weights)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
        config=config,
    )
    engine.checkpoint_engine = safe_checkpoint_engine()
    engine._copy_recovery_script = lambda save_path: None  # private (PRIVATE_NAMES)
    return engine


@contextlib.contextmanager
def gradient_clipping_off(engine: Any, off: bool) -> Iterator[None]:
    """With ``off``, the engine's gradient clipping is 0 inside the block and restored after it:
    DeepSpeed's clip fails on an update where no parameter has a gradient (all skipped)."""
    clip = engine._config.gradient_clipping  # private (PRIVATE_NAMES)
    if off:
        engine._config.gradient_clipping = 0.0
    try:
        yield
    finally:
        engine._config.gradient_clipping = clip


def gathered(engine: Any, fn: Any, d: distributed.Dist) -> Any:
    """``fn()`` on rank 0 with ZeRO-3's partitioned weights gathered (every rank takes part)."""
    if engine.zero_optimization_stage() < 3:
        return fn() if d.is_main else None
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        return fn() if d.is_main else None


def link_moments(engine: Any) -> None:
    """Make DeepSpeed's moment views of every parameter group readable (ZeRO 1-2).

    DeepSpeed (checked on 0.19.8) links each parameter to its slice of Adam's moments once, lazily,
    inside the loop that steps the parameter groups one by one, and marks it done after the first
    group: the parameters of the second group (ours: no weight decay) never get their slice, and
    ``safe_get_full_optimizer_state`` raises for them. Linking again after the first update, when
    every group has its state, fixes that. Private: ``_hp_optimizer_states_linked`` and
    ``_lazy_init_hp_params_optimizer_state`` of ZeRO 1-2's optimizer (PRIVATE_NAMES)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
