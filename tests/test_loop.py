"""The training skeleton's registered state (train/loop.py): what a checkpoint holds and restores."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dalle_repro.train.loop import Counters, TrainState
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
