"""The command line over the typed config: ``--help`` listing every dotted key with its doc, range and
flag, ``--config FILE``, ``key.sub=value`` overrides, and ``--flag value`` spellings of keys
(:func:`flag_aliases`), with errors that name the key and its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from dalle_repro.core.config import (
    ENV_FLAG,
    MISSING,
    PIPE_FLAG,
    ConfigError,
    T,
    build_config,
    deep_merge,
    load_yaml,
    nearest_key,
    parse_overrides,
    refuse_pipe,
    type_name,
)


def describe(cls: type, prefix: str = "", defaults: Any = None, flags: Mapping[str, str] | None = None) -> list[str]:
    """One line per leaf field: dotted key, type, default and doc. Used by ``--help``.
    ``defaults``: an instance whose values are the defaults shown (a section built by its factory);
    ``flags``: dotted key -> the command-line flag that sets it, shown beside the key."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    flags = flags or {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = getattr(defaults, f.name, None) if defaults is not None else None
            if sub is None and f.default_factory is not MISSING:
                sub = f.default_factory()
            lines.extend(describe(tp, key + ".", sub, flags))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        bounds = [
            f"{w} {f.metadata[n]}"
            for n, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if f.metadata.get(n) is not None
        ]
        rng = f" [{', '.join(bounds)}]" if bounds else ""
        flag = f"  [{flags[key]}" + (f" | --no-{flags[key][2:]}]" if default is True else "]") if key in flags else ""
        lines.append(f"  {key} ({type_name(tp)}{rng}) = {default!r}{flag}\n      {f.metadata.get('doc', '')}")
    return lines


def plain_text(text: str) -> str:
    """Docs as a terminal shows them: RST literals (````x````) as x, and references to this project's
    internal spec ("SPEC §3") and its open-point marker "[?]" dropped (the docs that carry the
    marker say in words what the paper leaves open)."""
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\s*\(SPEC §[\d.]+\)|,?\s*SPEC §[\d.]+", "", text)
    return text.replace("[?] ", "")


def cli_help(cls: type, usage: str, flags: Mapping[str, str] | None = None) -> str:
    """A ``--help`` text listing every config key of ``cls`` (in :func:`plain_text`), with the
    command-line flag beside each key that has one (``flags``: flag -> dotted key)."""
    env = (
        f"\n\n{ENV_FLAG}: let the YAML config read environment variables (${{oc.env:NAME}}); off by default, so "
        "that a shared config cannot copy a secret into the run's config.yaml, checkpoints and wandb."
        f"\n{PIPE_FLAG}: let the YAML config hold pipe: shards (shell commands); off by default, so that a shared "
        "config cannot run commands here. A pipe: shard given on the command line (key.sub=pipe:...) needs no flag."
    )
    by_key = {key: flag for flag, key in (flags or {}).items()}
    keys = "\n".join(describe(cls, flags=by_key))
    how = (
        "set in YAML, as key.sub=value, or with the flag shown in brackets"
        if by_key
        else "set in YAML or as key.sub=value"
    )
    return plain_text(usage.rstrip() + env + f"\n\nConfig keys ({how}):\n" + keys)


# ----------------------------------------------------------------------------------------------
# Command-line flags as spellings of config keys


def flag_aliases(cls: type, prefix: str = "", only: Sequence[str] | None = None) -> dict[str, str]:
    """``--name-with-dashes`` -> ``prefix + name_with_dashes`` for the leaf fields of ``cls`` (or
    those named in ``only``): the ``--flag value`` spellings a command accepts besides dotted keys."""
    hints = typing.get_type_hints(cls)
    aliases = {
        "--" + f.name.replace("_", "-"): prefix + f.name
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(hints[f.name]) and (only is None or f.name in only)
    }
    if "--config" in aliases:  # parse_cli's own flag (the YAML of the whole command) would take it first
        raise ValueError(
            f"{cls.__name__}.{aliases['--config']}: --config is the command's YAML file; name the field otherwise"
        )
    return aliases


def _leaf(cls: type, key: str) -> tuple[Any, Mapping[str, Any]]:
    """The type and metadata of the field at dotted ``key`` of ``cls``."""
    head, _, rest = key.partition(".")
    f = next((f for f in dataclasses.fields(cls) if f.name == head), None)
    if f is None:
        raise KeyError(key)
    tp = typing.get_type_hints(cls)[head]
    return _leaf(tp, rest) if rest else (tp, f.metadata)


def _wants_text(tp: Any) -> bool:
    """Whether a command-line value for ``tp`` is kept as typed (a path, a caption, a choice of
    words), rather than read as a YAML scalar (numbers, true/false, null)."""
    origin = typing.get_origin(tp)
    if tp is str:
        return True
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_wants_text(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def _scalar(raw: str, tp: Any) -> Any:
    if _wants_text(tp):
        return raw
    try:
        return parse_overrides([f"v={raw}"])["v"]
    except ConfigError:
        return raw  # the coercion then names the key and what it expected


def _list_item_type(tp: Any) -> Any | None:
    """The item type when ``tp`` is a list (or an optional list), else None."""
    for t in (tp, *[a for a in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType)]):
        if typing.get_origin(t) in (list, tuple, Sequence):
            args = [a for a in typing.get_args(t) if a is not Ellipsis]
            return args[0] if args else Any
    return None


def _is_bool(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in typing.get_args(tp))


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        data = data.setdefault(part, {})
    data[last] = value


def _unknown_flag(flag: str, aliases: Mapping[str, str]) -> ConfigError:
    near = nearest_key(flag, list(aliases))
    return ConfigError(f"unknown flag {flag}" + (f"; did you mean {near}?" if near else ""))


def parse_flags(
    cls: type, argv: Sequence[str], aliases: Mapping[str, str], positional: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Split a command line into the values its flags set (a nested dict) and its ``key=value``
    overrides. A flag names a key (``aliases``); a bool key's flag takes no value (``--no-NAME``
    sets it false); a list key's flag takes the values that follow it up to the next flag or
    ``key=value`` and may repeat. Other words go into the list key ``positional``."""
    data: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {}
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        word, i = argv[i], i + 1
        if not word.startswith("--"):
            if "=" in word or positional is None:
                overrides.append(word)
            else:
                lists.setdefault(positional, []).extend(_items(word, *_leaf(cls, positional)))
            continue
        flag, eq, inline = word.partition("=")
        negated = flag.startswith("--no-") and flag not in aliases and "--" + flag[5:] in aliases
        key = aliases.get("--" + flag[5:] if negated else flag)
        if key is None:
            raise _unknown_flag(flag, aliases)
        tp, meta = _leaf(cls, key)
        if _is_bool(tp) and not eq:
            _set(data, key, not negated)
            continue
        if negated:
            raise _unknown_flag(flag, aliases)
        values = [inline] if eq else []
        if not eq:
            if i >= len(argv):
                raise ConfigError(f"{flag} ({key}) needs a value")
            values.append(argv[i])
            i += 1
            while (
                _list_item_type(tp) is not None
                and i < len(argv)
                and not argv[i].startswith("--")
                and "=" not in argv[i]
            ):
                values.append(argv[i])
                i += 1
        if _list_item_type(tp) is None:
            _set(data, key, _scalar(values[0], tp))
        else:
            for v in values:
                lists.setdefault(key, []).extend(_items(v, tp, meta))
    for key, items in lists.items():
        _set(data, key, items)
    return data, overrides


def _items(raw: str, tp: Any, meta: Mapping[str, Any]) -> list[Any]:
    item_tp = _list_item_type(tp)
    sep = meta.get("sep")
    parts = [p.strip() for p in raw.split(sep) if p.strip()] if sep else [raw]
    return [_scalar(p, item_tp) for p in parts]


def _name_flag(message: str, aliases: Mapping[str, str]) -> str:
    """A config error about a key that has a flag, with the flag named too."""
    for flag, key in aliases.items():
        if message.startswith(f"{key}:") or message.startswith(f"{key}["):
            return f"{message} ({flag})"
    return message


def parse_cli(
    cls: type[T],
    argv: Sequence[str] | None,
    doc: str,
    default_config: str | None = None,
    flags: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
    positional: str | None = None,
) -> tuple[T | None, dict[str, bool]]:
    """The command line of every entry point: ``[--config FILE] [FLAGS] [--flag value ...] [key.sub=value ...]``.

    ``flags``: switches that are not config (``--resume``). ``aliases``: ``--flag`` -> dotted key,
    the familiar spellings of keys (:func:`flag_aliases`, :func:`parse_flags`); their values go
    between the YAML file and the ``key=value`` overrides. ``positional``: the list key that bare
    words fill. Returns (None, {}) after printing ``--help``; exits with status 2 and the dotted key
    (and its flag) on a bad config. ``--local_rank`` (which the deepspeed launcher passes) is
    accepted and ignored: the environment carries it too.
    """
    aliases = dict(aliases or {})
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--config", default=default_config)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument(ENV_FLAG, action="store_true")
    p.add_argument(PIPE_FLAG, action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    for flag in flags:
        p.add_argument(flag, action="store_true")
    a, rest = p.parse_known_args(argv)
    if a.help:
        print(cli_help(cls, doc, aliases))
        return None, {}
    try:
        given, overrides = parse_flags(cls, rest, aliases, positional) if aliases or positional else ({}, rest)
        data: dict[str, Any] = load_yaml(a.config, a.config_env) if a.config else {}
        if not a.allow_pipe:
            refuse_pipe(data, f"config file {a.config}")
        data = deep_merge(deep_merge(data, given), parse_overrides(overrides))
        cfg = build_config(cls, data)
    except ConfigError as e:
        print(f"config error: {_name_flag(str(e), aliases)}", file=sys.stderr)
        raise SystemExit(2) from None
    names = [f.lstrip("-").replace("-", "_") for f in (*flags, PIPE_FLAG)]
    return cfg, {n: getattr(a, n) for n in names}
