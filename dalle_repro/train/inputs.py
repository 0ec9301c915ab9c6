"""What a run reads, checked at its start, before anything is built or trained.

A wrong path or too few shards must not surface late: a validation path that names no file would
fail at the final validation, after every update; too few shards for the ranks and workers would
fail only after the model (and DeepSpeed) were built. Each check here names the config key to
change and what to do.
"""

from __future__ import annotations

import logging
from typing import Any

from dalle_repro.core.config import ConfigError
from dalle_repro.data.sources import expand_shards

log = logging.getLogger(__name__)


def check_shards(key: str, spec: str, ranks: int = 1, workers: int | None = None) -> list[str]:
    """The shards of ``spec`` (config key ``key``), or a ConfigError naming the key when none is
    there. ``workers`` (the training split's ``data.num_workers``): every reader (rank x worker)
    needs a shard of its own, so fewer shards than readers fail too, saying how to fix it."""
    try:
        paths = expand_shards(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    if workers is None:
        return paths
    per_rank = max(1, workers)
    if len(paths) < ranks * per_rank:
        most = len(paths) // ranks  # workers per rank the shards can feed
        fix = f"lower data.num_workers to {most}" if most >= 1 else f"start at most {len(paths)} ranks"
        raise ConfigError(
            f"{key}: {len(paths)} shards cannot feed {ranks} ranks x {per_rank} workers (each reader needs a shard "
            f"of its own): re-run make_shards with a smaller --shard-size to make at least {ranks * per_rank} "
            f"shards, or {fix}"
        )
    return paths


def check_run_shards(
    shards: str, val_shards: str | None, ranks: int, workers: int, shards_key: str = "data.shards"
) -> None:
    """The training shards (against ranks x workers) and the validation shards, if any."""
    check_shards(shards_key, shards, ranks, workers)
    if val_shards is not None:
        check_shards("run.val_shards", val_shards)


def schedule_notes(schedule: Any, keys: tuple[str, ...], steps: int, section: str = "schedule") -> list[str]:
    """A note for each schedule length in ``keys`` of ``schedule`` longer than the run's ``steps``:
    such a schedule never reaches its end value (a paper config's 150,000-update tau schedule in a
    400-update run left tau at 1, with no word). A length of 0 or None is no schedule."""
    notes = []
    for key in keys:
        length = getattr(schedule, key, None)
        if length and length > steps:
            notes.append(
                f"{section}.{key}={length} is longer than run.steps={steps}: the run ends {steps / length:.0%} of "
                f"the way along it (set {section}.{key} to at most {steps}, or train longer)"
            )
    return notes


def warn_long_schedules(schedule: Any, keys: tuple[str, ...], steps: int, is_main: bool = True) -> list[str]:
    """Log :func:`schedule_notes` as warnings on the main rank; returns them."""
    notes = schedule_notes(schedule, keys, steps)
    if is_main:
        for note in notes:
            log.warning(note)
    return notes
