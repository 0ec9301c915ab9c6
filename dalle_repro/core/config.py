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

import contextvars
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import OmegaConf
from omegaconf.resolvers import oc

from dalle_repro.core.files import atomic_write_text

T = TypeVar("T")

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names the dotted key."""


def arg(
    default: Any = MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Any = MISSING,
    sep: str | None = None,
) -> Any:
    """A documented dataclass field with an optional numeric range.

    ``ge``/``gt``/``le``/``lt`` bound numeric fields (and each element of a sequence of numbers).
    Mutable defaults must come through ``factory``; a section's factory also gives its defaults
    when a config sets only some of its keys. ``sep``: a list field's command-line flag splits its
    value there (``--blur-radii 0,1,2``); without it each use of the flag adds one item.
    """
    if not doc:
        raise TypeError("every config field needs a doc string")
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default: pass factory= instead")
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "sep": sep}
    if factory is not MISSING:
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


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected {type_name(tp)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad
        return build_config(tp, value, key + ".")
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


def build_config(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
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
            given = data[name]
            if (
                dataclasses.is_dataclass(hints[name])
                and f.default_factory not in (MISSING, hints[name])
                and isinstance(given, Mapping)
            ):
                # a factory such as lambda: SampleSettings(keep=1) gives the section's defaults; a plain
                # class factory adds nothing, and a section's values derived in __post_init__ stay derived
                given = deep_merge(to_dict(f.default_factory()), given)
            value = _coerce(given, hints[name], key)
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        elif dataclasses.is_dataclass(hints[name]):
            value = build_config(hints[name], {}, key + ".")
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
PIPE_FLAG = "--allow-pipe"


def _find_value(value: Any, pattern: str, key: str = "") -> str | None:
    """The dotted key of the first string in ``value`` (nested dicts and lists) that matches ``pattern``."""
    if isinstance(value, dict):
        return next((k for k2, v in value.items() if (k := _find_value(v, pattern, f"{key}{k2}."))), None)
    if isinstance(value, list):
        return next((k for i, v in enumerate(value) if (k := _find_value(v, pattern, f"{key}{i}."))), None)
    if isinstance(value, str) and re.search(pattern, value):
        return key.rstrip(".")
    return None


def _env_reference(value: Any, key: str = "") -> str | None:
    """The dotted key of the first value that reads an environment variable (``${oc.env:...}``)."""
    return _find_value(value, r"\$\{\s*(oc\.)?env\s*:", key)


# While load_yaml resolves a file read without allow_env, the environment variables its values ask
# for are recorded here and none is read. The pattern check in load_yaml catches the plain forms
# before resolving; this catches the rest (``${oc.${a.b}:NAME}``, a resolver name built by another
# interpolation), in the resolver itself.
_ENV_ASKED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("env_asked", default=None)


def _guarded_env(key: str, *default: Any) -> Any:
    asked = _ENV_ASKED.get()
    if asked is not None:
        asked.append(key)
        raise KeyError(f"environment variable {key} refused")
    return oc.env(key, *default)


OmegaConf.register_resolver("oc.env", _guarded_env, replace=True, annotation_validation="off")


def refuse_pipe(data: Any, source: str) -> None:
    """Raise :class:`ConfigError` when ``data``, read from ``source`` (a file), holds a ``pipe:`` shard.

    A ``pipe:`` shard runs a shell command when a reader opens it, so it is taken from the command
    line only (an override or a flag), where the user typed it: a config, plan or list that came
    with someone else's data set or run must not run commands on this machine. Any string holding
    ``pipe:`` counts, wherever it sits (a brace pattern or an override string inside a list can
    carry one too). ``PIPE_FLAG`` on the command line accepts them."""
    if (key := _find_value(data, r"pipe:")) is not None:
        raise ConfigError(
            f"{key}: {source} holds a pipe: shard, a shell command; commands are taken from the command line "
            f"only: give it there ({key}=...) or add {PIPE_FLAG} to run the file's commands"
        )


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
    asked: list[str] = []
    token = _ENV_ASKED.set(None if allow_env else asked)
    try:
        data = OmegaConf.to_container(conf, resolve=True)
    except Exception as e:  # omegaconf wraps the resolver's error
        if asked:
            raise ConfigError(
                f"config file {p} reads the environment variable {asked[0]} through an interpolation; configs "
                f"resolve none unless you pass {ENV_FLAG}"
            ) from None
        raise ConfigError(f"config file {p}: cannot resolve its interpolations: {e}") from None
    finally:
        _ENV_ASKED.reset(token)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build and validate a config dataclass from a nested mapping."""
    return build_config(cls, data)


def load_config(
    cls: type[T],
    yaml_path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    allow_env: bool = False,
    allow_pipe: bool = False,
) -> T:
    """Defaults of ``cls`` <- the YAML file <- ``key.sub=value`` overrides, validated.
    ``allow_env``: let the YAML file read environment variables (see :func:`load_yaml`);
    ``allow_pipe``: let it hold ``pipe:`` shards (see :func:`refuse_pipe`; overrides may always)."""
    data: dict[str, Any] = load_yaml(yaml_path, allow_env) if yaml_path else {}
    if not allow_pipe:
        refuse_pipe(data, f"config file {yaml_path}")
    data = deep_merge(data, parse_overrides(overrides))
    return build_config(cls, data)


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
