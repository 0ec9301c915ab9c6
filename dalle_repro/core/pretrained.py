"""Model folders: ``config.yaml`` beside ``model.safetensors``, written atomically and read back
strictly (shapes checked against the config, no pickle), so a model is rebuilt from its folder alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dalle_repro.core import faults
from dalle_repro.core.config import ConfigError, from_dict, load_yaml, to_yaml
from dalle_repro.core.files import honour_umask

T = TypeVar("T")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Folders


def check_replaceable(final: Path, new_entries: set[str], overwrite: bool) -> None:
    """FileExistsError unless ``final`` may be replaced by a folder holding ``new_entries``: it is
    absent, or everything in it is a name the new folder has (a folder of ours, written before),
    or ``overwrite``. A user's folder with other files in it is never wiped by accident."""
    if not final.exists():
        return
    if not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a folder")
    foreign = sorted(set(os.listdir(final)) - new_entries)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{final} already holds files that are not this model's ({shown}); refusing to replace it: "
            "choose an empty or new folder, or pass --overwrite"
        )


def copy_model_folder(src: str | Path, dst: str | Path) -> None:
    """Copy what a model folder is made of, ``config.yaml`` and the ``*.safetensors`` beside it, as
    regular files, and nothing else.

    The folder (a dVAE someone shared) is copied into an export that is passed on in turn: a whole
    copy that follows links would carry along a ``README -> ~/.ssh/id_rsa``. Links, folders and
    other names are left out (logged); a link or special file in place of the model's own files
    is refused."""
    src, dst = Path(src), Path(dst)
    dst.mkdir()
    skipped = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name != "config.yaml" and not entry.name.endswith(".safetensors"):
            skipped.append(entry.name)
            continue
        try:  # no link followed, the check on the opened file
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise ValueError(f"{entry.path}: not a regular file of the model folder ({e})") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{entry.path}: not a regular file of the model folder")
            with open(dst / entry.name, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
    if not (dst / "config.yaml").is_file():
        raise ValueError(f"{src} has no config.yaml: not a model folder")
    if skipped:
        log.info("copied the model files of %s; left out %s", src, ", ".join(skipped))


def write_folder(
    directory: str | Path,
    files: dict[str, dict[str, torch.Tensor]],
    texts: dict[str, str],
    folders: dict[str, str | Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``NAME.safetensors`` for each entry of ``files``, each text file and a copy of each of
    ``folders`` (name -> a model folder, :func:`copy_model_folder`), then rename the whole into place.

    An existing folder of that name is replaced only once the new one is whole, and only if it holds
    nothing but what the new one holds (:func:`check_replaceable`; ``overwrite`` lifts that).
    """
    final = Path(directory)
    names = {f"{n}.safetensors" for n in files} | set(texts) | set(folders or {})
    check_replaceable(final, names, overwrite)  # before any work
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        for name, tensors in files.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, src in (folders or {}).items():
            copy_model_folder(src, tmp / name)
        for p in tmp.rglob("*"):
            honour_umask(p)  # safetensors writes its files 0600
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        honour_umask(tmp)
        faults.point("checkpoint_write", final.name)
        if final.exists():
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_pretrained(
    directory: str | Path,
    args: Any,
    files: dict[str, dict[str, torch.Tensor]],
    full_config: Any = None,
    overwrite: bool = False,
) -> Path:
    """A folder that rebuilds the model alone: ``config.yaml`` + ``{name}.safetensors`` per entry.

    ``config.yaml`` is the full run config when given (it has a ``model`` section), else ``{model: args}``.
    An existing folder with other files in it is refused unless ``overwrite`` (:func:`write_folder`).
    """
    config = full_config if full_config is not None else {"model": args}
    return write_folder(directory, files, {"config.yaml": to_yaml(config)}, overwrite=overwrite)


def read_model_args(directory: str | Path, args_cls: type[T]) -> T:
    """The ``model`` section of ``DIR/config.yaml``, validated into ``args_cls``."""
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a model folder (it needs config.yaml and *.safetensors)")
    data = load_yaml(path)
    if "model" not in data:
        raise ConfigError(f"{path} has no 'model' section")
    try:
        return from_dict(args_cls, data["model"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


WANTED = {
    "DVAEArgs": "a dVAE model folder (config.yaml + model.safetensors: RUN/dvae of launch/train_dvae.py)",
    "TransformerArgs": "a prior export (RUN/export of launch/train_prior.py)",
}


def folder_kind(d: Path) -> tuple[str, Path | None]:
    """What a folder given as a model is, in words, and where the model in it is (None: nowhere)."""
    if (d / "export" / "export.json").is_file():
        return "a prior training run", d / "export"
    if (d / "export.json").is_file():
        return "a prior export", d
    if (d / "dvae" / "config.yaml").is_file() and (d / "dvae" / "model.safetensors").is_file():
        return "a dVAE training run", d / "dvae"
    if (d / "config.yaml").is_file():
        model = load_yaml(d / "config.yaml").get("model") or {}
        if isinstance(model, dict) and "n_hid" in model:
            return "a dVAE model folder", d
        if isinstance(model, dict) and "depth" in model:
            return "a prior weights folder", d
    if (d / "checkpoints").is_dir():
        return "a training run with no exported model yet", None
    if any(d.glob("*.tar")):
        return "a folder of shards", None
    if not any(d.iterdir()):
        return "an empty folder", None
    return "a folder with no model in it", None


def _check_folder_kind(d: Path, args_cls: type) -> None:
    """A clear error when ``d`` is a run folder, a model of the other kind, shards or nothing."""
    wanted = WANTED.get(args_cls.__name__)
    if wanted is None:
        return
    kind, model = folder_kind(d)
    ok = {"DVAEArgs": ("a dVAE model folder",), "TransformerArgs": ("a prior export", "a prior weights folder")}
    if kind in ok[args_cls.__name__]:
        return
    if model is not None and model != d and folder_kind(model)[0] in ok[args_cls.__name__]:
        raise FileNotFoundError(f"{d} is {kind}; its model is in {model}: give that folder")
    raise FileNotFoundError(f"{d} is {kind}, not {wanted}")


def _pretrained_paths(directory: str | Path, args_cls: type[T], weights: str) -> tuple[T, Path]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"model folder {d} does not exist")
    _check_folder_kind(d, args_cls)
    args = read_model_args(d, args_cls)
    path = d / f"{weights}.safetensors"
    if not path.is_file():
        have = sorted(p.name for p in d.glob("*.safetensors"))
        raise FileNotFoundError(f"{path} not found (the folder has {have})")
    return args, path


def pretrained_args(directory: str | Path, args_cls: type[T]) -> T:
    """A model folder's sizes (its ``config.yaml``), after the same checks as loading it, without
    reading its weights."""
    return _pretrained_paths(directory, args_cls, "model")[0]


def file_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, read from its header alone (no tensor is loaded)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def build_pretrained(directory: str | Path, args_cls: type[T], model_cls: Any, weights: str = "model") -> Any:
    """A model built from a folder's ``config.yaml`` and loaded with its weights, checked before any
    memory is spent: the model is first built on the meta device and its shapes compared with the
    weights file's header, so that a config from elsewhere (``dim: 100000``) cannot make this
    process allocate what it describes. A ValueError lists every tensor that does not fit."""
    args, path = _pretrained_paths(directory, args_cls, weights)
    theirs = file_shapes(path)
    _check_depth_first(args, model_cls, len(theirs), f"{path} (with {Path(directory) / 'config.yaml'})")
    with torch.device("meta"):
        probe = model_cls(args)
    problem = shape_mismatch(model_shapes(probe), theirs, f"{path} (with {Path(directory) / 'config.yaml'})")
    if problem:
        raise ValueError(problem)
    model = model_cls(args)
    model.load_state_dict(load_file(str(path)))
    return model


def _check_depth_first(args: Any, model_cls: Any, n_tensors: int, source: str) -> None:
    """For a model of ``depth`` alike blocks: the tensor count that depth means (from probes of one
    and two blocks) against the file header's count, before the model is probed at its full depth.
    Probing is linear in the depth (1000 blocks: seconds), and the depth comes from the folder's
    config.yaml, which may come from someone else."""
    depth = getattr(args, "depth", None)
    if not dataclasses.is_dataclass(args) or not isinstance(depth, int) or depth <= 2:
        return
    with torch.device("meta"):
        one, two = (len(model_cls(dataclasses.replace(args, depth=k)).state_dict()) for k in (1, 2))
    expected = one + (depth - 1) * (two - one)
    if expected != n_tensors:
        raise ValueError(
            f"{source} does not fit the model: its depth {depth} means {expected} tensors, the file holds {n_tensors}"
        )


def shape_mismatch(own: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]], source: str) -> str | None:
    """None when ``theirs`` (a checkpoint's tensor shapes) fits ``own`` (the model's), else a message
    listing every missing, unexpected and misshapen tensor."""
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {theirs[k]} vs model {own[k]}" for k in set(own) & set(theirs) if own[k] != theirs[k]
    )
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{source} does not fit the model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 20} more)" if len(items) > 20 else ""
            parts.append(f"  {title}: " + ", ".join(items[:20]) + more)
    return "\n".join(parts)


def model_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The full shape of every state-dict entry (ZeRO-3's partitioned parameters included)."""
    full = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    return {k: full.get(k, tuple(v.shape)) for k, v in module.state_dict().items()}


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, or raise ValueError listing every missing, unexpected and misshapen tensor."""
    problem = shape_mismatch(model_shapes(module), {k: tuple(v.shape) for k, v in state.items()}, source)
    if problem:
        raise ValueError(problem)
    module.load_state_dict(state)


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every weight's bytes, to check that data-parallel replicas agree, and which dVAE
    made a folder of token shards."""
    return tensors_digest(model.state_dict())


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """:func:`weights_digest` of a state dict (names and values, whatever the memory layout)."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())  # C-order bytes, whatever the layout
    return h.hexdigest()[:16]
