"""Checkpoints and pretrained folders: safetensors, JSON and YAML only, written atomically.

A pretrained folder (what ``DVAE.from_pretrained`` reads) holds ``config.yaml``, whose ``model``
section rebuilds the model, and ``model.safetensors`` (optionally ``ema.safetensors``).

A training checkpoint is a folder ``RUN/checkpoints/step_00001000/`` holding the same plus the
optimizer state and the train state (step, data position, RNG states, scaler, anything else).
Tensors go to safetensors; everything else goes to ``state.json``, where each tensor is replaced
by a reference to its safetensors key. Nothing is pickled, so loading runs no code.

Writes are atomic: a checkpoint is assembled in a temporary folder and renamed into place, so a
folder named ``step_*`` is always whole, and :meth:`Checkpoints.latest` never picks a partial one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dalle_repro.core.config import to_yaml
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.pretrained import write_folder

STEP_DIR = re.compile(r"^step_(\d{8,})$")


# ----------------------------------------------------------------------------------------------
# Nested state <-> (JSON skeleton, tensors)


def flatten_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able skeleton and a flat dict of tensors.

    Dicts with non-string keys (an optimizer's per-parameter state) and tuples are tagged so
    that :func:`unflatten_state` restores them exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(x))
            return {"__ndarray__": path}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: walk(v, f"{path}.{k}") for k, v in x.items()}
            return {
                "__items__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]
            }
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path} in a checkpoint")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return tensors[x["__ndarray__"]].numpy()
            if "__items__" in x:
                return {walk(k): walk(v) for k, v in x["__items__"]}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def rng_state() -> dict[str, Any]:
    """Every global generator a training step may draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """``RUN/checkpoints/step_*`` folders: save atomically, keep the last ``keep``, find the latest."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    @staticmethod
    def step_of(folder: Path) -> int:
        """The update a ``step_*`` checkpoint folder was written at; ValueError for another name."""
        m = STEP_DIR.match(folder.name)
        if m is None:
            raise ValueError(f"{folder} is not a checkpoint folder (step_NNNNNNNN)")
        return int(m.group(1))

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=self.step_of)

    def latest(self) -> Path | None:
        done = [p for p in self.all() if (p / "state.json").is_file()]
        return done[-1] if done else None

    def save(
        self,
        step: int,
        files: dict[str, dict[str, torch.Tensor]],
        state: dict[str, Any],
        config: Any,
    ) -> Path:
        skeleton, tensors = flatten_state(state)
        all_files = dict(files)
        all_files["state"] = tensors
        texts = {"state.json": json.dumps(skeleton), "config.yaml": to_yaml(config)}
        path = write_folder(self.root / f"step_{step:08d}", all_files, texts)
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*"):  # half-written folders of a killed writer (one writer per run)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        return path

    @staticmethod
    def load(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Every ``*.safetensors`` of the folder (by name) and the restored train state."""
        p = Path(path)
        skeleton_path = p / "state.json"
        if not skeleton_path.is_file():
            raise FileNotFoundError(f"{skeleton_path} not found: {p} is not a whole checkpoint")
        files = {f.name[: -len(".safetensors")]: load_file(str(f)) for f in p.glob("*.safetensors")}
        state = unflatten_state(json.loads(skeleton_path.read_text()), files.pop("state", {}))
        return files, state


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
