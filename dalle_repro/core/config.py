"""Layered, typed configuration: dataclass defaults <- YAML <- dotted command-line overrides.

Each component declares its own ``...Args`` dataclass next to its code, with every field made by
:func:`arg`, which carries the field's documentation and its allowed range. A job's config is a
dataclass whose fields are those component dataclasses. :func:`load_config` merges the layers and
validates everything before any work starts: an unknown key, a wrong type or an out-of-range value
raises :class:`ConfigError` naming the dotted key, the bad value and what is allowed.

OmegaConf parses YAML files and ``key.sub=value`` overrides (so ``1e-4``, ``true`` and ``[1, 2]`` mean
what they look like); the validation and coercion into dataclasses is ours, so that error messages
name the field the way the user wrote it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import OmegaConf

from dalle_repro.core.files import atomic_write_text

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names the dotted key."""


def arg(
    default: Any = _MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Any = _MISSING,
) -> Any:
    """A documented dataclass field with an optional numeric range.

    ``ge``/``gt``/``le``/``lt`` bound numeric fields (and each element of a sequence of numbers).
    Mutable defaults must come through ``factory``.
    """
    if not doc:
        raise TypeError("every config field needs a doc string")
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default: pass factory= instead")
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_doc(cls: type, name: str) -> str:
    """The documentation string of one field of a config dataclass."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("doc", "")
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# Type checking and coercion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        # Compare type too, so that True does not pass for 1.
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise bad
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise bad
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, tp):
        return value
    raise bad


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for name, ok, word in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            bound = meta.get(name)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{key}: got {v!r}; allowed: {word} {bound}")


def _edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of two neighbours, one each."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def nearest_key(key: str, valid: Sequence[str]) -> str | None:
    """The valid key a misspelt one most likely meant (fewest edits among the similar ones), or None."""
    near = difflib.get_close_matches(key, list(valid), n=5)
    return min(near, key=lambda v: _edit_distance(key, v)) if near else None


# Keys a user's YAML may still hold, and the key that replaced each: an error names the new one.
RENAMED = {
    "run.precision": "precision.dtype",
    "run.output": "run.run_dir (the model is written to RUN/clip)",
    "data.val_shards": "run.val_shards",
}


def _renamed(key: str) -> str | None:
    """The error for a key of :data:`RENAMED`, also inside an enclosing section (the demo's ``clip.``)."""
    for old, new in RENAMED.items():
        if key == old or key.endswith("." + old):
            return f"{key} is now {key[: len(key) - len(old)]}{new}; rename it in your config"
    return None


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for k in data:
        if k not in fields and (renamed := _renamed(f"{prefix}{k}")):
            raise ConfigError(renamed)
        if k not in fields:
            near = nearest_key(str(k), list(fields))
            hint = f"; did you mean {prefix}{near}?" if near else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {prefix}{k}{hint} (valid keys here: {valid})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            value = _coerce(data[name], hints[name], key)
        elif f.default is not _MISSING:
            value = f.default
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        elif dataclasses.is_dataclass(hints[name]):
            value = _build(hints[name], {}, key + ".")
        else:
            raise ConfigError(f"{key}: required, no default")
        if not dataclasses.is_dataclass(value):
            _check_range(value, f.metadata, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks raise with the field name; add the section's prefix.
        raise ConfigError(prefix + str(e) if prefix and not str(e).startswith(prefix) else str(e)) from None


# ----------------------------------------------------------------------------------------------
# Layers


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parse ``key.sub=value`` strings into a nested dict (values parsed as YAML scalars)."""
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override {o!r} is not of the form key.sub=value")
    try:
        conf = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # omegaconf raises several grammar errors
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None
    return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]


ENV_FLAG = "--config-env"


def _env_reference(value: Any, key: str = "") -> str | None:
    """The dotted key of the first value that reads an environment variable (``${oc.env:...}``)."""
    if isinstance(value, dict):
        return next((k for k2, v in value.items() if (k := _env_reference(v, f"{key}{k2}."))), None)
    if isinstance(value, list):
        return next((k for i, v in enumerate(value) if (k := _env_reference(v, f"{key}{i}."))), None)
    if isinstance(value, str) and re.search(r"\$\{\s*(oc\.)?env\s*:", value):
        return key.rstrip(".")
    return None


def load_yaml(path: str | os.PathLike[str], allow_env: bool = False) -> dict[str, Any]:
    """Read a YAML config file into a dict, with an error naming the file when it is unusable.

    A value that reads an environment variable (``${oc.env:WANDB_API_KEY}``) is refused unless
    ``allow_env`` (the launch scripts' ``--config-env``): a shared config could otherwise copy a
    secret into the run's config.yaml, its checkpoints and wandb."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        conf = OmegaConf.load(p)
    except Exception as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not allow_env and (key := _env_reference(OmegaConf.to_container(conf, resolve=False))) is not None:
        raise ConfigError(
            f"{key}: config file {p} reads an environment variable; configs resolve none unless you pass {ENV_FLAG} "
            "(the value would be written into the run's config.yaml, checkpoints and wandb)"
        )
    data = OmegaConf.to_container(conf, resolve=True)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build and validate a config dataclass from a nested mapping."""
    return _build(cls, data)


def load_config(
    cls: type[T],
    yaml_path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    allow_env: bool = False,
) -> T:
    """Defaults of ``cls`` <- the YAML file <- ``key.sub=value`` overrides, validated.
    ``allow_env``: let the YAML file read environment variables (see :func:`load_yaml`)."""
    data: dict[str, Any] = load_yaml(yaml_path, allow_env) if yaml_path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass, or of a dict holding some (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def yaml_comment(text: str) -> str:
    """``text`` as YAML comment lines: notes that readers of the file (load_yaml) skip."""
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines())


def save_config(cfg: Any, run_dir: str | os.PathLike[str], name: str = "config.yaml", header: str = "") -> Path:
    """Write the resolved config into the run directory (atomically) and return its path.

    ``header`` goes above it as YAML comments: what the run decided on its machine (the precision
    ``auto`` picked, and why) without changing the values, so the file still loads as the config."""
    path = Path(run_dir) / name
    atomic_write_text(path, yaml_comment(header) + to_yaml(cfg))
    return path


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf field: dotted key, type, default and doc. Used by ``--help``."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, key + "."))
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        bounds = [
            f"{w} {f.metadata[n]}"
            for n, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if f.metadata.get(n) is not None
        ]
        rng = f" [{', '.join(bounds)}]" if bounds else ""
        lines.append(f"  {key} ({_type_name(tp)}{rng}) = {default!r}\n      {f.metadata.get('doc', '')}")
    return lines


def plain_text(text: str) -> str:
    """Docs as a terminal shows them: RST literals (````x````) as x, and references to this project's
    internal spec ("SPEC §3") and its open-point marker "[?]" dropped (the docs that carry the
    marker say in words what the paper leaves open)."""
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\s*\(SPEC §[\d.]+\)|,?\s*SPEC §[\d.]+", "", text)
    return text.replace("[?] ", "")


def cli_help(cls: type, usage: str) -> str:
    """A ``--help`` text listing every config key of ``cls`` (in :func:`plain_text`)."""
    env = (
        f"\n\n{ENV_FLAG}: let the YAML config read environment variables (${{oc.env:NAME}}); off by default, so "
        "that a shared config cannot copy a secret into the run's config.yaml, checkpoints and wandb."
    )
    keys = "\n".join(describe(cls))
    return plain_text(usage.rstrip() + env + "\n\nConfig keys (set in YAML or as key.sub=value):\n" + keys)


def parse_cli(
    cls: type[T], argv: Sequence[str] | None, doc: str, default_config: str | None = None, flags: Sequence[str] = ()
) -> tuple[T | None, dict[str, bool]]:
    """The launch scripts' command line: ``[--config FILE] [FLAGS] [key.sub=value ...]``.

    Returns (None, {}) after printing ``--help``; exits with status 2 and the dotted key on a bad
    config. ``--local_rank`` (which the deepspeed launcher passes) is accepted and ignored: the
    environment carries it too.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=default_config)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument(ENV_FLAG, action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    for flag in flags:
        p.add_argument(flag, action="store_true")
    a, overrides = p.parse_known_args(argv)
    if a.help:
        print(cli_help(cls, doc))
        return None, {}
    try:
        cfg = load_config(cls, a.config, overrides, allow_env=a.config_env)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, {f.lstrip("-").replace("-", "_"): getattr(a, f.lstrip("-").replace("-", "_")) for f in flags}
