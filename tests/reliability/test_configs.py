"""Every field of every shipped config rejects a wrong type and an out-of-range value by its dotted key,
and an unknown key gets the nearest valid one as a suggestion.

The fields are enumerated from the dataclasses, so a field added later is covered without editing
this file.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

import pytest

from dalle_repro.core.config import ConfigError, from_dict
from dalle_repro.demo.config import DemoConfig
from dalle_repro.train.clip import ClipTrainConfig
from dalle_repro.train.dvae import DVAETrainConfig
from dalle_repro.train.prior_config import PriorTrainConfig

CONFIGS = [DVAETrainConfig, PriorTrainConfig, ClipTrainConfig, DemoConfig]


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def nested(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def out_of_range(tp: Any, meta: dict[str, Any]) -> Any | None:
    """A value just outside the field's declared bounds, or None when it has none."""
    integer = int in _scalar_types(tp) and float not in _scalar_types(tp)
    step = 1 if integer else 0.5
    for name, sign in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        bound = meta.get(name)
        if bound is None:
            continue
        if name in ("ge", "le"):
            v = bound + sign * step
        else:
            v = bound
        v = int(v) if integer else float(v)
        return [v] if _is_sequence(tp) else v
    return None


def _scalar_types(tp: Any) -> set[Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType, list, tuple):
        out: set[Any] = set()
        for a in typing.get_args(tp):
            if a is not Ellipsis:
                out |= _scalar_types(a)
        return out
    return {tp}


def _is_sequence(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return True
    if origin in (typing.Union, __import__("types").UnionType):
        return any(_is_sequence(a) for a in typing.get_args(tp))
    return False


CASES = [(cls, key, tp, f) for cls in CONFIGS for key, tp, f in leaves(cls)]


def test_the_suite_sees_every_config():
    assert len(CASES) > 150  # the four configs have well over 150 fields between them
    assert sum(out_of_range(tp, dict(f.metadata)) is not None for _, _, tp, f in CASES) > 40


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_rejects_a_wrong_type_by_its_dotted_key(cls):
    wrong = {"a mapping": "where a value belongs"}  # no leaf field accepts a mapping
    checked = 0
    for key, tp, _ in leaves(cls):
        if tp is Any:
            continue
        with pytest.raises(ConfigError) as e:
            from_dict(cls, nested(key, wrong))
        assert key in str(e.value), (key, str(e.value))
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_bounded_field_rejects_an_out_of_range_value_by_its_dotted_key(cls):
    checked = 0
    for key, tp, f in leaves(cls):
        bad = out_of_range(tp, dict(f.metadata))
        if bad is None:
            continue
        with pytest.raises(ConfigError) as e:
            from_dict(cls, nested(key, bad))
        assert key in str(e.value), (key, bad, str(e.value))
        checked += 1
    assert checked > 3


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_misspelt_key_is_rejected_with_the_nearest_valid_one(cls):
    for key, _, f in leaves(cls):
        *parents, name = key.split(".")
        if len(name) < 4:
            continue
        typo = name[:-2] + name[-1] + name[-2]  # swap the last two letters
        bad_key = ".".join([*parents, typo])
        with pytest.raises(ConfigError) as e:
            from_dict(cls, nested(bad_key, f.default if f.default is not dataclasses.MISSING else None))
        msg = str(e.value)
        assert f"unknown key {bad_key}" in msg, msg
        assert f"did you mean {key}?" in msg, msg
