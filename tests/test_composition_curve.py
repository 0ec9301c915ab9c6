"""bench/composition_curve.py without training: the runs' configs scale every update count alike,
and a finished run's evaluation becomes a point of the curve, a table row and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bench_script

from dalle_repro.core.config import load_config
from dalle_repro.demo.config import DemoConfig, dvae_config, prior_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def curve():
    return bench_script("composition_curve")


def test_a_run_config_multiplies_every_stage_alike(curve, tmp_path):
    base = ROOT / "configs" / "demo" / "demo.yaml"
    data = curve.run_config(base, tmp_path / "x2", 2.0, seed=7)
    path = tmp_path / "demo.yaml"
    path.write_text(json.dumps(data))
    cfg = load_config(DemoConfig, path, [])
    ref = load_config(DemoConfig, base, [])
    d, d0 = dvae_config(cfg, plan=False), dvae_config(ref, plan=False)
    p, p0 = prior_config(cfg, plan=False), prior_config(ref, plan=False)
    assert d.run.steps == 2 * d0.run.steps and d.schedule.tau_steps == 2 * d0.schedule.tau_steps
    assert d.schedule.lr_steps == 2 * d0.schedule.lr_steps and d.run.seed == 7
    assert p.run.steps == 2 * p0.run.steps and p.schedule.warmup_steps == 2 * p0.schedule.warmup_steps
    assert p.run.seed == 7 and cfg.shapes.seed == 7 and cfg.train_minutes is None
    assert cfg.clip.run.steps == 2 * ref.clip.run.steps
    assert cfg.out_dir == str(tmp_path / "x2") and cfg.tokens_output == str(tmp_path / "x2" / "tokens")
    assert cfg.evaluation.sample.seed == 7


def test_a_strokes_run_seeds_the_strokes_scenes(curve, tmp_path):
    base = ROOT / "configs" / "demo" / "strokes.yaml"
    path = tmp_path / "demo.yaml"
    path.write_text(json.dumps(curve.run_config(base, tmp_path / "x2", 2.0, seed=2)))
    cfg = load_config(DemoConfig, path, [])
    ref = load_config(DemoConfig, base, [])
    assert cfg.dataset == "strokes" and cfg.strokes.seed == 2 and cfg.shapes == ref.shapes
    assert cfg.strokes.train == ref.strokes.train and prior_config(cfg, plan=False).run.seed == 2


def test_finished_runs_become_a_table_and_a_plot(curve, tmp_path):
    for factor, (seen, held) in {0.5: (30, 10), 1: (60, 25)}.items():
        run = tmp_path / f"x{factor:g}"
        (run / "evaluation").mkdir(parents=True)
        (run / "stages").mkdir()
        slow = 3 if factor == 0.5 else 1  # the 0.5x run shared the cores: its stages took 3x their cost
        for name, sec in (("dvae", 120 * factor), ("prior", 480 * factor), ("clip", 60 * factor)):
            (run / "stages" / f"{name}.json").write_text(json.dumps({"seconds": sec * slow}))
        updates = {"dvae": int(3800 * factor), "prior": int(1200 * factor), "clip": int(400 * factor)}
        (run / "plan.json").write_text(json.dumps({"planned_updates": updates}))

        def rep(k):
            share = {"rate": k / 96, "k": k, "n": 96, "ci": [k / 96 - 0.1, k / 96 + 0.1]}
            return {"tasks": {"reranked": {"all": share, "shape": share}}, "dvae_ceiling": {"all": 0.9}}

        ev = {"splits": {"seen": rep(seen), "heldout": rep(held)}}
        (run / "evaluation" / "evaluation.json").write_text(json.dumps(ev))
    assert curve.main(["--out", str(tmp_path), "--factors", "0.5", "1", "2", "--collect-only"]) == 0
    points = json.loads((tmp_path / "curve.json").read_text())
    assert [p["factor"] for p in points] == [0.5, 1]  # the 2x run has not finished: no point
    assert points[1]["training_minutes"] == pytest.approx(11.0) == points[1]["compute_minutes"]
    assert points[0]["training_minutes"] == pytest.approx(16.5) and points[0]["compute_minutes"] == pytest.approx(5.5)
    md = (tmp_path / "curve.md").read_text()
    assert "| 1x | 11.0 / 11.0 | 62.5% [52.5, 72.5] | 26.0% [16.0, 36.0] |" in md
    assert "| 0.5x | 16.5 / 5.5 |" in md
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_the_demo_is_started_on_a_folder_it_can_make(curve, tmp_path, monkeypatch):
    """The demo refuses to replace a folder it did not make, so the run's config and log lie beside
    the run's folder and the folder is left for the demo to make (a run that did so failed at once)."""
    calls = []

    def fake_run(cmd, stdout, stderr, cwd):
        cfg = Path(cmd[cmd.index("--config") + 1])
        calls.append((cfg, (tmp_path / "x0.5").exists(), json.loads(cfg.read_text())["out_dir"]))
        return type("Done", (), {"returncode": 3})()

    monkeypatch.setattr(curve.subprocess, "run", fake_run)
    assert curve.main(["--out", str(tmp_path), "--factors", "0.5"]) == 3
    assert calls == [(tmp_path / "x0.5.yaml", False, str(tmp_path / "x0.5"))]
    assert (tmp_path / "x0.5.log").is_file()


def test_the_demo_config_is_its_own_flag_and_no_field_can_shadow_config(curve, monkeypatch, tmp_path):
    # --config is parse_cli's (the YAML of the command itself): a field named config could never be set
    # by its flag, and the curve's demo config once was one (--config configs/demo/strokes.yaml failed)
    import dataclasses

    from dalle_repro.core.cli import flag_aliases

    runs = []
    monkeypatch.setattr(curve, "run_config", lambda base, *a: runs.append(base) or {})
    monkeypatch.setattr(curve.subprocess, "run", lambda *a, **k: type("Done", (), {"returncode": 1})())
    strokes = str(ROOT / "configs" / "demo" / "strokes.yaml")
    assert curve.main(["--out", str(tmp_path), "--factors", "2", "--demo", strokes]) == 1  # the run's exit status
    assert runs == [Path(strokes)]

    @dataclasses.dataclass
    class Shadowing:
        config: str = "x"

    with pytest.raises(ValueError, match="Shadowing.config: --config is the command's YAML file"):
        flag_aliases(Shadowing)
