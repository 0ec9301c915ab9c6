"""The demo on the strokes set: demo.yaml's settings untouched but for paths, its data stage, and its
evaluation reading strokes."""

from __future__ import annotations

import json

import pytest

from dalle_repro.core.config import load_config, to_dict
from dalle_repro.data import strokes
from dalle_repro.demo import pipeline as demo


@pytest.fixture
def cfg():
    return load_config(demo.DemoConfig, "configs/demo/strokes.yaml", [])


def _drop(d: dict, *keys: str) -> dict:
    """``d`` without the dotted ``keys``."""
    d = json.loads(json.dumps(d))
    for key in keys:
        *path, last = key.split(".")
        node = d
        for p in path:
            node = node[p]
        node.pop(last)
    return d


def test_the_strokes_demo_is_the_shapes_demo_with_only_its_data_and_paths_changed(cfg):
    """The strokes set must never be tuned on: every model, training, sampling and evaluation setting
    is demo.yaml's."""
    shapes = load_config(demo.DemoConfig, "configs/demo/demo.yaml", [])
    own = ("out_dir", "dataset", "shapes", "strokes", "text.path", "tokens_output", "prior_overrides")
    samples = ("captions_train", "captions_new")
    assert _drop(to_dict(cfg), *own, *samples) == _drop(to_dict(shapes), *own, *samples)
    assert _drop(to_dict(cfg.strokes), "output") == _drop(to_dict(shapes.shapes), "output")
    paths = ("data.shards", "run.val_shards", "run.run_dir")
    assert _drop(to_dict(demo.dvae_config(cfg)), *paths) == _drop(to_dict(demo.dvae_config(shapes)), *paths)
    prior = (*paths, "dvae", "text.path", "run.sample_prompts")
    assert _drop(to_dict(demo.prior_config(cfg)), *prior) == _drop(to_dict(demo.prior_config(shapes)), *prior)
    clip = ("text.path", "data.shards", "run.val_shards", "run.run_dir")
    assert _drop(to_dict(demo.clip_config(cfg)), *clip) == _drop(to_dict(demo.clip_config(shapes)), *clip)


def test_the_strokes_demo_points_at_its_own_data_and_folders(cfg):
    assert cfg.dataset == "strokes" and demo.data_dir(cfg).as_posix() == "data/strokes"
    d, p = demo.dvae_config(cfg), demo.prior_config(cfg)
    assert d.data.shards == "data/strokes/unlabelled/*.tar" and d.run.run_dir == "outputs/demo-strokes/dvae"
    assert p.data.shards == "data/strokes_tokens/train/*.tar" and p.text.path == "data/strokes/tokenizer.json"
    assert p.dvae == "outputs/demo-strokes/dvae/dvae"
    assert "--world strokes" in demo.evaluate_command(cfg) and "data/strokes/heldout" in demo.evaluate_command(cfg)
    held = set(strokes.HELD_OUT)
    for caption in [*cfg.captions_train, *p.run.sample_prompts]:  # captions of seen pairs
        assert not strokes.parse_caption(caption).pairs() & held, caption
    assert all(strokes.parse_caption(c).pairs() & held for c in cfg.captions_new)  # new: a held-out pair each


def test_the_data_stage_writes_the_strokes_set(tmp_path, cfg):
    tiny = [f"strokes.output={tmp_path}/strokes", "strokes.train=20", "strokes.heldout=4", "strokes.shard_size=10"]
    small = load_config(demo.DemoConfig, "configs/demo/strokes.yaml", [*tiny, "strokes.unlabelled=10"])
    result = demo.stage_data(small)
    assert result["world"] == "strokes" and result["written"] == 20 and result["heldout"]["written"] == 4
    assert len(list((demo.data_dir(small) / "unlabelled").glob("*.tar"))) == 1
    assert (demo.data_dir(small) / "summary.json").is_file() and list((demo.data_dir(small) / "heldout").glob("*.tar"))
    data = next(s for s in demo.stages() if s.name == "data")
    assert data.settings(small) != data.settings(load_config(demo.DemoConfig, "configs/demo/demo.yaml", []))


def test_the_evaluation_stage_reads_strokes_with_the_strokes_reader(cfg, monkeypatch):
    seen = {}

    class Prior:
        def use_trained_precision(self):
            pass

    def zero_shot(prior, reranker, seen_shards, heldout_shards, settings, **kw):
        seen.update(kw, seen_shards=seen_shards, heldout_shards=heldout_shards)
        return {"world": kw["world"], "splits": {}}

    monkeypatch.setattr(demo, "load_prior", lambda path: Prior())
    monkeypatch.setattr(demo, "Reranker", lambda path: None)
    monkeypatch.setattr(demo, "zero_shot", zero_shot)
    result = demo.stage_evaluate(cfg)
    assert seen["world"] == "strokes" and seen["heldout_shards"] == "data/strokes/heldout/*.tar"
    assert "--world strokes" in result["command"]
    shapes = load_config(demo.DemoConfig, "configs/demo/demo.yaml", [])
    demo.stage_evaluate(shapes)
    assert seen["world"] == "shapes" and seen["heldout_shards"] == "data/shapes/heldout/*.tar"
    evaluate = next(s for s in demo.stages() if s.name == "evaluate")
    assert evaluate.outputs(cfg) == [demo.Path(cfg.out_dir, "evaluation", "evaluation.json")]


def test_the_report_names_the_strokes_set(tmp_path):
    from dalle_repro.demo.report import write_report

    data = {"world": "strokes", "written": 20, "heldout": {"written": 4}}
    text = write_report(tmp_path, {"data": data}, {}).read_text()
    assert "the strokes set" in text and "the shapes set" not in text
    data.pop("world")  # a shapes run's marker written before the world was recorded
    assert "the shapes set" in write_report(tmp_path, {"data": data}, {}).read_text()
