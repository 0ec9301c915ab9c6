"""The demo's per-machine profile: less work where its stages run in fp32."""

from __future__ import annotations

import pytest

from dalle_repro import demo
from dalle_repro.config import load_config


@pytest.fixture
def cfg():
    return load_config(demo.DemoConfig, "configs/demo/demo.yaml", [])


@pytest.mark.parametrize("fp32", [True, False])
def test_fp32_overrides_apply_only_where_the_stage_runs_in_fp32(cfg, monkeypatch, fp32):
    monkeypatch.setattr(demo, "_runs_fp32", lambda requested: fp32)
    assert cfg.fp32_dvae_overrides and cfg.fp32_prior_overrides  # the shipped demo has a profile
    plain = load_config(
        demo.DemoConfig, "configs/demo/demo.yaml", ["fp32_dvae_overrides=[]", "fp32_prior_overrides=[]"]
    )
    monkeypatch.setattr(demo, "_runs_fp32", lambda requested: fp32)
    d, d0 = demo.dvae_config(cfg), demo.dvae_config(plain)
    p, p0 = demo.prior_config(cfg), demo.prior_config(plain)
    assert (d.run.steps < d0.run.steps) == fp32 and (p.run.steps < p0.run.steps) == fp32
    assert (d == d0) != fp32 and (p == p0) != fp32


def test_the_users_overrides_win_over_the_fp32_profile(cfg, monkeypatch):
    monkeypatch.setattr(demo, "_runs_fp32", lambda requested: True)
    mine = load_config(
        demo.DemoConfig, "configs/demo/demo.yaml", ["dvae_overrides=[run.steps=7]", "prior_overrides=[run.steps=5]"]
    )
    assert demo.dvae_config(mine).run.steps == 7 and demo.prior_config(mine).run.steps == 5


def test_the_pick_follows_the_precision_setting():
    assert demo._runs_fp32("fp32") and not demo._runs_fp32("bf16")


def test_the_emoji_demo_stays_an_option():
    emoji = load_config(demo.DemoConfig, "configs/demo/emoji.yaml", [])
    assert emoji.dataset == "emoji" and demo.data_dir(emoji).as_posix() == "data/emoji"
    assert demo.dvae_config(emoji).data.shards == "data/emoji/train/*.tar"
    assert demo.prior_config(emoji).data.shards == "data/emoji_tokens/train/*.tar"


def test_the_default_demo_is_the_shapes_set(cfg):
    assert cfg.dataset == "shapes" and demo.data_dir(cfg).as_posix() == "data/shapes"
    d, p = demo.dvae_config(cfg), demo.prior_config(cfg)
    assert d.data.shards == "data/shapes/train/*.tar" and d.run.val_shards == "data/shapes/val/*.tar"
    assert p.data.shards == "data/shapes_tokens/train/*.tar" and p.text.text_len == cfg.text.text_len
    assert "--heldout 'data/shapes/heldout/*.tar'" in demo.evaluate_command(cfg)
