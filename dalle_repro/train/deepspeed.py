"""DeepSpeed's checkpoint files without pickle: a checkpoint engine that writes safetensors.

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

import enum
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dalle_repro.core.config import honour_umask
from dalle_repro.train.checkpoint import flatten_state, unflatten_state

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
