"""configs/start/: the starting configs the README's own-data section uses, and the warning when a
schedule is longer than the run (a paper config's 150,000-update tau schedule in a 400-update run
left tau at 1 without a word)."""

from __future__ import annotations

import logging
from pathlib import Path

from dalle_repro.core.config import load_config
from dalle_repro.train.dvae import DVAETrainConfig
from dalle_repro.train.inputs import schedule_notes, warn_long_schedules
from dalle_repro.train.prior_config import PriorTrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_start_configs_load_and_their_schedules_fit_their_runs():
    d = load_config(DVAETrainConfig, ROOT / "configs/start/dvae.yaml")
    p = load_config(PriorTrainConfig, ROOT / "configs/start/prior.yaml")
    assert d.precision.dtype == "auto" and p.precision.dtype == "auto"
    assert schedule_notes(d.schedule, ("tau_steps", "beta_steps", "lr_steps"), d.run.steps) == []
    assert schedule_notes(p.schedule, ("warmup_steps", "decay_steps"), p.run.steps) == []
    # the paths are the README's own-data steps: make_shards into data/mine, encode_tokens into data/mine-tokens
    assert d.data.shards == "data/mine/train/*.tar" and d.run.val_shards == "data/mine/val/*.tar"
    assert p.data.shards == "data/mine-tokens/train/*.tar" and p.dvae == f"{d.run.run_dir}/dvae"
    readme = (ROOT / "README.md").read_text()
    assert "configs/start/dvae.yaml" in readme and "configs/start/prior.yaml" in readme


def test_a_schedule_longer_than_the_run_is_named_with_its_key(caplog):
    d = load_config(DVAETrainConfig, ROOT / "configs/paper/dvae.yaml", ["run.steps=400"])
    with caplog.at_level(logging.WARNING, logger="dalle_repro.train.inputs"):
        notes = warn_long_schedules(d.schedule, ("tau_steps", "beta_steps", "lr_steps"), 400)
    assert notes and all("is longer than run.steps=400" in n for n in notes)
    assert any(n.startswith("schedule.tau_steps=") for n in notes)
    assert [r.getMessage() for r in caplog.records] == notes
    caplog.clear()
    warn_long_schedules(d.schedule, ("tau_steps",), 400, is_main=False)
    assert caplog.records == []  # one rank speaks
