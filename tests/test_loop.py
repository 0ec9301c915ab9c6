"""The training skeleton's registered state (train/loop.py): what a checkpoint holds and restores."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dalle_repro.train.checkpoint import Checkpoints
from dalle_repro.train.loop import Counters, RunArgs, Task, TrainState, fit
from dalle_repro.train.metrics import LogArgs, MetricsLogger
from dalle_repro.train.optim import ModuleState

MAIN = SimpleNamespace(rank=0, world_size=1, is_main=True)


class Position:
    """A stand-in for a loader: a position that a checkpoint must carry per rank."""

    def __init__(self) -> None:
        self.at = 0

    def state_dict(self) -> dict[str, int]:
        return {"at": self.at}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.at = state["at"]


def test_registered_objects_round_trip_by_kind():
    model, counters, pos = torch.nn.Linear(3, 2), Counters(step=7, skipped_steps=1), Position()
    pos.at = 42
    ts = TrainState(counters)
    ts.register("model", ModuleState(model), "file")
    ts.register("loader", pos, "rank")
    ts.register("absent", None)  # a part this run does not have (no fp16 scaler): not registered
    files, state = ts.gather(MAIN, model)
    assert set(files) == {"model"} and state["step"] == 7 and state["ranks"][0]["loader"] == {"at": 42}
    assert "absent" not in state and state["counters"]["skipped_steps"] == 1

    fresh, counters2, pos2 = torch.nn.Linear(3, 2), Counters(), Position()
    ts2 = TrainState(counters2)
    ts2.register("model", ModuleState(fresh), "file")
    ts2.register("loader", pos2, "rank")
    ts2.restore(Path("ckpt"), files, state, MAIN)
    assert torch.equal(fresh.weight, model.weight) and pos2.at == 42
    assert counters2 == Counters(step=7, skipped_steps=1)
    with pytest.raises(ValueError, match="registered twice"):
        ts2.register("loader", pos2, "rank")


def test_a_checkpoint_of_other_ranks_or_without_a_part_is_refused_by_name():
    ts = TrainState(Counters())
    ts.register("optimizer", Position())
    with pytest.raises(ValueError, match="written by 2 ranks; this run has 1"):
        ts.restore(Path("ckpt"), {}, {"step": 1, "ranks": [{}, {}], "optimizer": {"at": 1}}, MAIN)
    with pytest.raises(ValueError, match="holds no 'optimizer'"):
        ts.restore(Path("ckpt"), {}, {"step": 1, "ranks": [{}]}, MAIN)


def test_counters_kept_at_the_top_level_are_read():
    """A dVAE checkpoint held its step and skipped_steps at the top level of state.json."""
    counters = Counters()
    TrainState(counters).restore(Path("ckpt"), {}, {"step": 5, "skipped_steps": 2, "ranks": [{}]}, MAIN)
    assert counters.step == 5 and counters.skipped_steps == 2


# ----------------------------------------------------------------------------------------------
# run.end_by (LengthPlan)


@dataclass
class _Schedule:
    decay_steps: int = 1000


@dataclass
class _Config:
    run: RunArgs
    schedule: _Schedule


class Sleeper(Task):
    """A task whose update takes ``delay`` seconds and whose schedule has a length to scale."""

    length_keys = ("run.steps", "schedule.decay_steps", "run.ckpt_every")

    def __init__(self, run_dir: Path, delay: float, steps: int = 1000, end_by: float | None = None) -> None:
        self.config = _Config(RunArgs(run_dir=str(run_dir), steps=steps, ckpt_every=500, end_by=end_by), _Schedule())
        self.d = SimpleNamespace(rank=0, world_size=1, is_main=True, device=torch.device("cpu"))
        self.state = TrainState(Counters())
        self.ckpts = Checkpoints(run_dir)
        self.delay, self.saves, self.changed = delay, [], 0

    def batches(self):
        return iter(())

    def train_step(self, it):
        time.sleep(self.delay)
        self.state.counters.step += 1
        return {"loss": 1.0}

    def rate(self, updates, seconds):
        return {}

    def evaluate(self, validate, sample):
        return {}

    def save(self):
        self.saves.append(self.step)
        return self.ckpts.root

    def export(self):
        return None

    def length_changed(self):
        self.changed += 1


def _fit(task: Sleeper, tmp_path: Path) -> dict:
    logger = MetricsLogger(tmp_path, LogArgs(every=1000), task.config, task.config.run.steps, task.step)
    try:
        return fit(task, task.config.run, logger)
    finally:
        logger.close()


def test_end_by_shortens_the_run_and_its_schedules_to_end_in_time(tmp_path):
    start = time.time()
    task = Sleeper(tmp_path, delay=0.01, end_by=start + 0.8)
    out = _fit(task, tmp_path)
    took = time.time() - start
    # unplanned, 1000 updates of 10 ms take 10 s; planned, the run ends near its 0.8 s
    assert out["ended"] == "done" and 20 < task.step < 200 and took < 2.0
    cfg, c = task.config, task.state.counters
    assert cfg.run.steps == task.step == c.planned_steps and c.configured_steps == 1000 and task.changed >= 1
    fraction = task.step / 1000
    assert cfg.schedule.decay_steps == math.floor(1000 * fraction)  # the schedule ends with the run
    assert cfg.run.ckpt_every == max(1, math.floor(500 * fraction)) and task.saves[-1] == task.step
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["planned_steps"] == task.step and final["configured_steps"] == 1000
    assert final["length_changes"] and final["length_changes"][0]["planned_steps"] >= task.step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("planned_steps" in r for r in rows)


def test_a_resumed_run_keeps_the_plans_schedules_and_a_later_deadline_lengthens_it(tmp_path):
    task = Sleeper(tmp_path, delay=0.0, steps=1000)
    task.state.counters.step, task.state.counters.planned_steps, task.state.counters.configured_steps = 30, 60, 1000
    _fit(task, tmp_path)  # no end_by: the plan the checkpoint holds stands
    assert task.step == 60 and task.config.schedule.decay_steps == 60 and task.changed == 1
    assert "planned_steps" not in json.loads((tmp_path / "final_metrics.json").read_text())

    later = Sleeper(tmp_path / "b", delay=0.0, steps=1000, end_by=time.time() + 3600)
    later.state.counters.step, later.state.counters.planned_steps, later.state.counters.configured_steps = 30, 60, 1000
    _fit(later, tmp_path / "b")  # an hour is enough for all: back to the configured length, never past it
    assert later.step == 1000 and later.config.schedule.decay_steps == 1000

    other = Sleeper(tmp_path / "c", delay=0.0, steps=500)
    other.state.counters.step, other.state.counters.planned_steps, other.state.counters.configured_steps = 30, 60, 1000
    _fit(other, tmp_path / "c")  # the configured length changed since the plan: the new one is trained
    assert other.step == 500 and other.config.schedule.decay_steps == 1000 and other.changed == 0


def test_without_end_by_nothing_changes(tmp_path):
    task = Sleeper(tmp_path, delay=0.0, steps=80)
    _fit(task, tmp_path)
    assert task.step == 80 and task.config.schedule.decay_steps == 1000 and task.changed == 0
    assert task.state.counters.planned_steps == 0


def test_a_deadline_already_past_is_ignored_with_a_warning(tmp_path, caplog):
    task = Sleeper(tmp_path, delay=0.0, steps=60, end_by=time.time() - 5)  # a saved config used again
    with caplog.at_level("WARNING"):
        _fit(task, tmp_path)
    assert task.step == 60 and task.changed == 0 and "run.end_by" in caplog.text and "past: ignored" in caplog.text
