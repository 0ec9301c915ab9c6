"""Fault points: named places where the reliability suite kills a process on purpose.

A real crash (an OOM kill, a node that loses power, a preempted job) lands anywhere. The suite in
``tests/reliability/`` needs to land on chosen places, repeatably, in processes it starts: between
two updates, half-way through a checkpoint write, between two shards. The code calls
:func:`point` at those places; it does nothing unless the environment asks for a fault there.

``DALLE_REPRO_KILL`` is a comma-separated list of ``NAME:KEY`` entries, e.g.
``after_step:5,checkpoint_write:step_00000006``. When :func:`point` is called with a name and key
in the list, the process sends itself SIGKILL: no handler, no ``finally`` and no flush runs, exactly
like ``kill -9``. ``DALLE_REPRO_KILL_RANK=R`` limits the faults to the process whose ``RANK`` is R
(the default is every rank, like a lost node). ``DALLE_REPRO_KILL_SIGNAL=TERM`` sends SIGTERM
instead (a preemption notice, which the trainers' handler turns into a checkpoint and exit 0), at
the same repeatable place.

The places:
- ``after_step:N``: after update N, before anything is logged or saved for it (both trainers);
- ``checkpoint_write:step_XXXXXXXX``: a checkpoint folder's files are written but not yet renamed
  into place (``checkpoint.write_folder``);
- ``deepspeed_saved:step_XXXXXXXX``: DeepSpeed's part of a prior checkpoint is written, ours is not;
- ``shard_written:NAME``: an output shard was renamed into place but its progress record was not
  yet written (make_shards and encode_tokens).
"""

from __future__ import annotations

import os
import signal

ENV = "DALLE_REPRO_KILL"
RANK_ENV = "DALLE_REPRO_KILL_RANK"
SIGNAL_ENV = "DALLE_REPRO_KILL_SIGNAL"


def _armed() -> frozenset[str]:
    spec = os.environ.get(ENV, "")
    return frozenset(s.strip() for s in spec.split(",") if s.strip())


def point(name: str, key: object) -> None:
    """SIGKILL (or ``DALLE_REPRO_KILL_SIGNAL``) this process if ``NAME:KEY`` is armed in
    ``DALLE_REPRO_KILL`` (and the rank matches)."""
    armed = _armed()
    if not armed or f"{name}:{key}" not in armed:
        return
    rank = os.environ.get(RANK_ENV)
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    name = os.environ.get(SIGNAL_ENV, "KILL")
    if name not in ("KILL", "TERM", "INT"):
        raise ValueError(f"{SIGNAL_ENV}={name!r}: expected KILL, TERM or INT")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
