"""One training skeleton for every trainer (the dVAE, the prior, the CLIP).

The loop owns what does not depend on the model:

- the schedule: a log row every ``log.every`` updates, validation every ``run.val_every``, samples
  every ``sample_every`` (where the trainer has them), a checkpoint every ``run.ckpt_every``;
- SIGTERM/SIGINT (a preempted job) and ``run.stop_after`` (a time-boxed job): the current update
  ends, a checkpoint is written and :func:`fit` returns (the command exits 0); ``--resume`` goes on;
- ``run.end_by`` (a wall-clock deadline): the run times its own updates and, where the rest would
  end after the deadline, shortens itself (:class:`LengthPlan`);
- ``run.max_nonfinite`` non-finite losses in a row: a checkpoint, then :class:`NonFiniteLosses`
  (the command exits 3);
- deterministic mode (``run.deterministic``), which exact resume needs on CPU;
- the end of a run: the checkpoint and the export are written *before* the final validation and
  samples, so that a failure there (a bad validation split, a sampler bug) loses no trained weight;
  then ``RUN/final_metrics.json``.

A trainer supplies a :class:`Task`: its ``train_step`` (one update), validation, export, and its
state as registered stateful objects (:class:`TrainState`: model, optimizer, EMA, loader position,
RNG, counters), which a checkpoint holds as a set, as torchtitan's CheckpointManager and lingua's
TrainState do, instead of a list kept by hand in each trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from dalle_repro.core import distributed, faults
from dalle_repro.core.config import arg
from dalle_repro.core.pretrained import weights_digest
from dalle_repro.train.checkpoint import Checkpoints, rng_state, save_json, set_rng_state
from dalle_repro.train.metrics import MetricsLogger, last_validation, read_metrics

log = logging.getLogger(__name__)


@dataclass
class RunArgs:
    """Length, checkpoints, validation and failure handling of a run: the part every trainer shares."""

    run_dir: str = arg("runs/run", "Folder for checkpoints, metrics, grids and the exported model.")
    steps: int = arg(1000, "Updates to train for.", gt=0)
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "auto: CUDA when there is one.")
    seed: int = arg(0, "Seed of the initial weights (the same on every rank) and of the data order.", ge=0)
    ckpt_every: int = arg(500, "Updates between checkpoints (one is always written at the end).", gt=0)
    keep: int = arg(3, "Checkpoints to keep.", ge=1)
    stop_after: int | None = arg(
        None, "Stop with a checkpoint after this many updates in this process (time-boxed jobs); resume later.", gt=0
    )
    val_every: int = arg(500, "Updates between validations (one always at the end).", gt=0)
    end_by: float | None = arg(
        None,
        "Unix time (s) by which the run, its final checkpoint, export and validation included, should end: "
        "it times its own updates and, where the rest would not fit, shortens itself (run.steps and every "
        "schedule length and interval by one fraction; never past the configured length). null: run.steps.",
        gt=0,
    )
    val_shards: str | None = arg(None, "Validation shards; null: no validation.")
    val_batches: int = arg(8, "Batches per validation (0: the whole split).", ge=0)
    deterministic: Literal["auto", "on", "off"] = arg(
        "auto",
        "torch.use_deterministic_algorithms, which exact resume needs (2-thread CPU embedding gradients vary "
        "otherwise; ~0-6% slower). auto: on for CPU, off for CUDA.",
    )
    max_nonfinite: int = arg(20, "Stop (with a checkpoint) after this many non-finite losses in a row.", ge=1)


class NonFiniteLosses(RuntimeError):
    """Too many non-finite losses in a row (the run wrote a checkpoint first)."""


class StopRequested:
    """Set by SIGTERM/SIGINT; the loop checks it (agreed across ranks) after each update."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.training = False  # set when the first update starts: before it there is nothing to save

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        if self.training:
            log.warning("%s received: the run stops after this update, with a checkpoint", self.signal)
        else:
            log.warning(
                "%s received before the first update: the run stops when its set-up ends, before training "
                "(no update was made, so there is nothing new to save)",
                self.signal,
            )


# ----------------------------------------------------------------------------------------------
# Registered state


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RNGState:
    """Every global generator a step may draw from, as a stateful object (each rank's own)."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


@dataclass
class Counters:
    """The update count and the events a run counts; part of the train state."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    # run.end_by's shortening (LengthPlan): the run's length as planned, and the configured length it
    # was planned from (0, 0: never shortened); a resumed run keeps the plan's schedules
    planned_steps: int = 0
    configured_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, int(state[f.name]))

    def shown(self) -> dict[str, int]:
        """What a log row reports (the step is the row's own key; the streak only matters to the stop rule)."""
        hidden = ("step", "nonfinite_in_row", "planned_steps", "configured_steps")
        return {k: v for k, v in self.state_dict().items() if k not in hidden}


class TrainState:
    """The set of stateful objects a checkpoint holds, registered by the trainer once at build time.

    ``file``: a flat dict of tensors, saved as ``NAME.safetensors`` (weights, EMA); ``shared``: the
    same on every rank, saved once in ``state.json`` (optimizer, scaler, counters); ``rank``: each
    rank's own, saved per rank (loader position, RNG)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.objects: dict[str, tuple[str, Stateful]] = {}
        self.register("counters", counters)

    def register(self, name: str, obj: Stateful | None, where: Literal["file", "shared", "rank"] = "shared") -> None:
        if obj is None:
            return
        if name in self.objects or name in ("step", "ranks"):
            raise ValueError(f"train state {name!r} registered twice (or a reserved name)")
        self.objects[name] = (where, obj)

    def _of(self, where: str) -> dict[str, Stateful]:
        return {k: o for k, (w, o) in self.objects.items() if w == where}

    def gather(self, d: distributed.Dist, replica: torch.nn.Module | None) -> tuple[dict, dict]:
        """(files, state) on rank 0 (empty elsewhere); every rank must call it. ``replica``: a model
        whose weights every rank holds whole, checked equal across ranks."""
        mine = {k: o.state_dict() for k, o in self._of("rank").items()}
        if replica is not None:
            mine["weights"] = weights_digest(replica)
        ranks = distributed.gather_objects(mine, d)
        if len({r.get("weights") for r in ranks}) != 1:  # data parallelism keeps replicas equal: a bug
            raise RuntimeError(
                f"data-parallel replicas diverged at step {self.counters.step}: {[r['weights'] for r in ranks]}"
            )
        if not d.is_main:
            return {}, {}
        files = {k: o.state_dict() for k, o in self._of("file").items()}
        state = {"step": self.counters.step, "ranks": ranks}
        return files, state | {k: o.state_dict() for k, o in self._of("shared").items()}

    def restore(self, path: Path, files: dict, state: dict, d: distributed.Dist) -> None:
        if len(state["ranks"]) != d.world_size:
            raise ValueError(f"{path} was written by {len(state['ranks'])} ranks; this run has {d.world_size}")
        for name, obj in self._of("file").items():
            if name not in files:
                raise FileNotFoundError(f"{path / (name + '.safetensors')} is missing: {path} cannot be resumed")
            obj.load_state_dict(files[name])
        for name, obj in self._of("shared").items():
            if name == "counters" and name not in state:  # a dVAE checkpoint kept its counts at the top level
                obj.load_state_dict(state)
                continue
            if name not in state:
                raise ValueError(f"{path / 'state.json'} holds no {name!r}: it was written by another trainer")
            obj.load_state_dict(state[name])
        mine = state["ranks"][d.rank]
        for name, obj in self._of("rank").items():
            obj.load_state_dict(mine[name])
        self.counters.step = int(state["step"])


# ----------------------------------------------------------------------------------------------
# The trainer's part


class Task(ABC):
    """What a trainer gives the loop. ``state`` holds its registered objects and counters."""

    state: TrainState
    ckpts: Checkpoints
    d: distributed.Dist
    config: Any  # what checkpoints store
    show: tuple[str, ...] = ("loss",)  # the metrics the progress bar shows
    val_key: str = "val_loss"  # the metric that marks a validation row
    sample_every: int | None = None  # updates between samples; None: the trainer has none
    # dotted keys of ``config`` that count updates and scale with the run's length (run.steps first):
    # what run.end_by's shortening scales, and what the demo's time plan scales
    length_keys: tuple[str, ...] = ("run.steps",)

    @property
    def step(self) -> int:
        return self.state.counters.step

    @abstractmethod
    def batches(self) -> Iterator[Any]:
        """The training data's iterator (closed when the loop ends)."""

    @abstractmethod
    def train_step(self, it: Iterator[Any]) -> dict[str, float]:
        """One update; counts it (and a skipped one) in ``state.counters``."""

    @abstractmethod
    def rate(self, updates: int, seconds: float) -> dict[str, float]:
        """Throughput since the last log row (img_per_s, tok_per_s)."""

    def data_errors(self) -> dict[str, float]:
        return {}

    @abstractmethod
    def evaluate(self, validate: bool, sample: bool) -> dict[str, Any]:
        """Validation metrics (rank 0; {} elsewhere) and/or samples; every rank calls it."""

    def replica(self) -> torch.nn.Module | None:
        """A model every rank holds whole, whose weights a checkpoint checks equal across ranks."""
        return None

    def save(self) -> Path:
        files, state = self.state.gather(self.d, self.replica())
        path = self.ckpts.root / f"step_{self.step:08d}"
        if self.d.is_main:
            path = self.ckpts.save(self.step, files, state, self.config)
        distributed.barrier()
        return path

    def resume(self, path: Path) -> None:
        files, state = Checkpoints.load(path)
        self.state.restore(path, files, state, self.d)

    @abstractmethod
    def export(self) -> Path | None:
        """The trained model for the next stage (rank 0 writes; every rank calls)."""

    def finish(self, val: dict[str, Any]) -> dict[str, Any]:
        """After the final validation: anything the export keeps of it; returns more final metrics."""
        return {}

    def length_changed(self) -> None:
        """Called after :class:`LengthPlan` set new values of ``length_keys`` in ``config``: whatever the
        trainer copied out of them before (a scheduler's total, an interval) reads them again."""
        return None


# ----------------------------------------------------------------------------------------------
# run.end_by


_clock = time.time  # the wall clock run.end_by is read against (tests set their own)


def get_key(config: Any, key: str) -> Any:
    """The value of a dotted key (``run.steps``) of a config dataclass."""
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def scaled_count(value: int | None, fraction: float) -> int | None:
    """``fraction`` of an update count, at least 1; 0 (a schedule held at its end value) and None stay."""
    return value if not value else max(1, math.floor(value * fraction))


class LengthPlan:
    """Fits a run into ``run.end_by`` from its own measured updates.

    A timer before training cannot know a run's real cost: the data loader beside it, the framework's
    all-reduce, validations and checkpoints, and a shared machine whose speed drifts (the demo's prior
    ran at 1.4-1.9x what its timer predicted on one CPU, docs/demo.md). So the run measures itself:
    from a few updates in, its mean seconds per update (validations and checkpoints included, as they
    recur), and at every twentieth of its length it forecasts its end: the updates left at that rate,
    plus the run's end (the longest checkpoint and evaluation seen). Where that ends after
    ``run.end_by`` it sets the run's length to what fits, and where a run shortened before could now
    fit more, it lengthens it again, never past the configured length. Every count in the task's
    ``length_keys`` (the run's length, the schedules' lengths, the intervals) scales by the same
    fraction, as the demo's time plan scales them before a run, so the schedules end with the run.
    final_metrics.json keeps the forecast made once a tenth had run, and how far the end it
    forecast, for the length finally trained, was from the real end.

    Every rank takes the mean of the ranks' measures, so all reach the same length. The plan is
    part of the train state (:class:`Counters`): a resumed run keeps the planned length and its
    schedules (unless its configured length changed). A run with ``end_by`` is not bit-reproducible:
    its length depends on the clock. ``end_by`` null changes nothing.
    """

    SKIP = 2  # the first updates of a process (allocator, first batch, lazy builds) are not timed

    def __init__(self, task: Task, run: RunArgs, logger: MetricsLogger) -> None:
        self.task, self.run, self.logger = task, run, logger
        if get_key(task.config, "run.steps") != run.steps or task.config.run is not run:
            raise RuntimeError("the loop's run settings must be the task's config.run")  # a trainer's wiring bug
        self.keys = task.length_keys
        self.configured = {k: get_key(task.config, k) for k in self.keys}
        self.steps = run.steps  # as configured
        self.every = max(5, self.steps // 20)
        self.start = task.step
        self.t_ref: float | None = None
        self.ref_step = 0
        self.next_check = self.start + self.SKIP + max(5, min(50, self.steps // 50))
        self.tail = {"save": 0.0, "evaluate": 0.0}
        self.changes: list[dict[str, Any]] = []
        self.forecast: dict[str, float] | None = None
        c = task.state.counters
        if c.planned_steps and c.configured_steps == self.steps and c.planned_steps != run.steps:
            self.apply(c.planned_steps, resumed=True)
        self.end_by = run.end_by
        if self.end_by is not None and any_rank(self.end_by <= _clock(), task.d.device):
            # a config saved by a run with a deadline, used again (a resume by hand): not this run's
            if task.d.is_main:
                log.warning(
                    "run.end_by=%s is %.0f s past: ignored, the run trains its length (%d updates)",
                    self.end_by,
                    _clock() - self.end_by,
                    run.steps,
                )
            self.end_by = None

    def timed(self, what: str, seconds: float) -> None:
        """A checkpoint's or an evaluation's seconds: the run's end costs the longest of each."""
        self.tail[what] = max(self.tail[what], seconds)

    def apply(self, steps: int, resumed: bool = False) -> None:
        fraction = steps / self.steps
        for key, value in self.configured.items():
            section, name = key.split(".")
            new = steps if key == "run.steps" else scaled_count(value, fraction)
            setattr(getattr(self.task.config, section), name, new)
        c = self.task.state.counters
        c.planned_steps, c.configured_steps = steps, self.steps
        self.logger.total = self.logger.bar.total = steps
        self.logger.bar.refresh()
        self.task.length_changed()
        if resumed and self.task.d.is_main:
            log.info("run.end_by's plan of the resumed run: %d of the configured %d updates", steps, self.steps)

    def after_update(self, step: int) -> None:
        if self.end_by is None:
            return
        if step == self.start + self.SKIP:
            self.t_ref, self.ref_step = time.perf_counter(), step
        if step < self.next_check or self.t_ref is None or step >= self.run.steps:
            return
        self.next_check = step + self.every
        mine = {
            "seconds_per_update": (time.perf_counter() - self.t_ref) / (step - self.ref_step),
            "left": self.end_by - _clock() - sum(self.tail.values()),
        }
        m = distributed.mean(mine, self.task.d.device)
        rate, left = m["seconds_per_update"], m["left"]
        fits = step + max(1, math.floor(left / rate))
        new = min(fits, self.steps)
        now = self.run.steps
        if abs(new - now) > max(1, now // 100):
            self.apply(new)
            row = {"planned_steps": new, "seconds_per_update": rate, "seconds_left": left}
            self.changes.append({"step": step, **row})
            self.logger.log(step, row)
            if self.task.d.is_main:
                log.warning(
                    "run.end_by: at update %d, %.3f s per update and %.0f s left: the run's length is now %d "
                    "updates (configured %d), its schedules scaled alike",
                    step,
                    rate,
                    left,
                    new,
                    self.steps,
                )
        if self.forecast is None and step - self.start >= self.steps // 10:
            # the rate and the end's cost as known once a tenth has run: summary() says how far the
            # end they forecast for the length finally trained was from the real one
            self.forecast = {"step": step, "time": _clock(), "rate": rate, "tail": sum(self.tail.values())}

    def summary(self) -> dict[str, Any]:
        """What final_metrics.json keeps of the plan (nothing without run.end_by)."""
        if self.end_by is None:
            return {}
        out: dict[str, Any] = {
            "end_by": self.end_by,
            "configured_steps": self.steps,
            "planned_steps": self.run.steps,
            "length_changes": self.changes,
            "ended_before_end_by_s": round(self.end_by - _clock(), 1),
        }
        if self.forecast is not None:
            f = self.forecast
            end = f["time"] + (self.run.steps - f["step"]) * f["rate"] + f["tail"]
            out["forecast"] = {
                "at_step": f["step"],
                "seconds_per_update": f["rate"],
                "end_error_s": round(_clock() - end, 1),
            }
        return out


# ----------------------------------------------------------------------------------------------
# The loop


@contextlib.contextmanager
def deterministic(mode: str, device: torch.device) -> Iterator[None]:
    """``run.deterministic`` for the length of a run, then the caller's setting back."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if mode == "on" or (mode == "auto" and device.type == "cpu"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def checkpoint_to_resume(run: RunArgs, resume_run: bool) -> Path | None:
    """The checkpoint ``--resume`` continues from; a run folder with checkpoints needs ``--resume``.
    Called before anything is built, so that a wrong folder costs nothing."""
    latest = Checkpoints(run.run_dir, run.keep).latest()
    if latest is not None and not resume_run:
        raise FileExistsError(
            f"{run.run_dir} already holds checkpoints ({latest.name}); pass --resume, or set another run.run_dir"
        )
    return latest if resume_run else None


def any_rank(flag: bool, device: torch.device) -> bool:
    return distributed.total({"flag": float(flag)}, device)["flag"] > 0


def fit(task: Task, run: RunArgs, logger: MetricsLogger, stop: StopRequested | None = None) -> dict[str, Any]:
    """Train ``task`` to ``run.steps`` (or a stop); returns the last validation metrics (rank 0),
    the step, and how the run ended: done, signal, stop_after or signal_before_training."""
    stop = stop or StopRequested()
    d = task.d
    if any_rank(stop.signal is not None, d.device):
        log.warning("stopped before the first update (%s); nothing was trained or saved", stop.signal or "another rank")
        return {"step": task.step, "ended": "signal_before_training"}
    stop.training = True
    ended, start = "done", task.step
    val: dict[str, Any] = {}
    window = _Window()
    plan = LengthPlan(task, run, logger)
    it = task.batches()
    try:
        while task.step < run.steps:
            ended, val = _one_update(task, run, logger, stop, it, start, val, window, plan)
            if ended != "done":
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # shuts the loader's workers down (they ignore SIGTERM; see data/loader.py)
    if task.step == run.steps:
        val = _finish(task, logger, plan, trained=task.step > start) or val
    return val | {"step": task.step, "ended": ended}


class _Window:
    """The updates since the last log row, and when it began: the rate's numerator and denominator."""

    def __init__(self) -> None:
        self.t0, self.updates = time.perf_counter(), 0

    def take(self) -> tuple[int, float]:
        got = self.updates, time.perf_counter() - self.t0
        self.t0, self.updates = time.perf_counter(), 0
        return got


def _one_update(
    task: Task,
    run: RunArgs,
    logger: MetricsLogger,
    stop: StopRequested,
    it: Iterator[Any],
    start: int,
    val: dict[str, Any],
    window: _Window,
    plan: LengthPlan,
) -> tuple[str, dict[str, Any]]:
    """One update and whatever the schedule asks for after it; returns (how the run goes on, val)."""
    metrics = task.train_step(it)
    step = task.step
    faults.point("after_step", step)
    logger.advance()
    window.updates += 1
    last = step == run.steps
    if step % logger.every == 0 or last:
        metrics = distributed.mean(metrics, None)
        errors = {f"data_{k}": v for k, v in distributed.total(task.data_errors()).items()}
        rate = task.rate(*window.take())
        logger.log(step, metrics | rate | task.state.counters.shown() | errors, show=task.show)
    validate = step % run.val_every == 0 and not last  # the last one comes after the export
    sample = task.sample_every is not None and step % task.sample_every == 0 and not last
    if validate or sample:
        t = time.perf_counter()
        val = _evaluate(task, logger, validate, sample) or val
        plan.timed("evaluate", time.perf_counter() - t)
    if task.state.counters.nonfinite_in_row >= run.max_nonfinite:
        task.save()
        raise NonFiniteLosses(
            f"{task.state.counters.nonfinite_in_row} non-finite losses in a row at step {step} "
            f"(run.max_nonfinite={run.max_nonfinite}); a checkpoint is in {task.ckpts.latest()}. "
            "Lower the learning rate, check the data, or try precision.dtype=bf16."
        )
    stopping = any_rank(stop.signal is not None, task.d.device)
    time_boxed = run.stop_after is not None and step - start >= run.stop_after
    if step % run.ckpt_every == 0 or last or stopping or time_boxed:
        t = time.perf_counter()
        task.save()
        plan.timed("save", time.perf_counter() - t)
    if (stopping or time_boxed) and not last:
        ended = "signal" if stopping else "stop_after"
        log.warning("stopped at step %d (%s); continue with --resume", step, ended)
        return ended, val
    plan.after_update(step)
    return "done", val


def _evaluate(task: Task, logger: MetricsLogger, validate: bool, sample: bool) -> dict[str, Any]:
    """Validation and samples leave the global generators as they found them, so that when they run
    (before or after a checkpoint, at the end or mid-run) never changes what training draws next."""
    saved = rng_state()
    try:
        val = task.evaluate(validate, sample)
    finally:
        set_rng_state(saved)
    if val:
        logger.log(task.step, val)
    return val


def _finish(task: Task, logger: MetricsLogger, plan: LengthPlan, trained: bool) -> dict[str, Any]:
    """The end of a run: the export first (the checkpoint is already written), then the final
    validation and samples, which may fail without losing the weights, then final_metrics.json."""
    path = task.export()
    if path is not None:
        log.info("exported the model to %s", path)
    run_dir = task.ckpts.root.parent
    # a run resumed after its last step validates again only if its final validation never ended
    done = not task.d.is_main or any(r.get("step") == task.step and task.val_key in r for r in read_metrics(run_dir))
    val = _evaluate(task, logger, True, True) if any_rank(trained or not done, task.d.device) else {}
    more = task.finish(val) | plan.summary()
    if task.d.is_main:
        val = val or last_validation(run_dir, task.val_key)
        save_json(run_dir / "final_metrics.json", val | more | {"step": task.step})
    distributed.barrier()
    return val
