"""demo/report.py: the time plan's predicted minutes beside each stage's actual ones."""

from __future__ import annotations

from dalle_repro.demo.report import plan_lines


def test_the_plan_shows_predicted_and_actual_minutes_per_stage():
    plan = {
        "train_minutes": 20,
        "fraction": 0.5,
        "planned_updates": {"dvae": 1250, "prior": 600, "clip": 200},
        "predicted_minutes_configured": {"dvae": 8.0, "prior": 24.0, "clip": 4.0},
    }
    seconds = {"dvae": {"seconds": 240.0}, "prior": {"seconds": 540.0}, "clip": {"seconds": 132.0}}
    md = "\n".join(plan_lines(plan, seconds))
    assert "| dvae | 4.0 min | 4.0 min | 1.00 |" in md
    assert "| prior | 12.0 min | 9.0 min | 0.75 |" in md
    assert "| clip | 2.0 min | 2.2 min | 1.10 |" in md
    assert "| all three | 18.0 min | 15.2 min | 0.84 |" in md
    # the prior's deadline shortened it to 540 of 600 updates; its own forecast said 30 s too little
    results = {"prior": {"step": 540, "ended_before_end_by_s": 3.2, "forecast": {"end_error_s": 30.0}}}
    md = "\n".join(plan_lines(plan, seconds, results))
    assert "| prior | 12.0 min | 9.0 min | 0.75 | 8.5 min (1.06) | 540 (600) | 3 s |" in md
    assert "| dvae | 4.0 min | 4.0 min | 1.00 | n/a | n/a | n/a |" in md
    assert "| prior |" not in "\n".join(plan_lines(plan, {"dvae": {"seconds": 1.0}}))  # not run yet: no row
    assert plan_lines({}, seconds) == []


def test_the_report_ends_with_the_command_that_opens_the_playground(tmp_path):
    from dalle_repro.demo.report import playground_lines

    assert playground_lines(tmp_path) == []  # no export: no command
    (tmp_path / "prior" / "export").mkdir(parents=True)
    (tmp_path / "prior" / "export" / "export.json").write_text("{}")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    lines = playground_lines(tmp_path)
    assert f"python launch/serve.py --model {tmp_path}/prior/export --clip {tmp_path}/clip" in lines


def test_the_zero_shot_table_shows_the_readers_pick_beside_clips():
    """The reader's pick (the best any reranker could take from the candidates) is its own column;
    an evaluation written before it existed says so instead of failing."""
    import numpy as np
    import torch

    from dalle_repro.data.shapes import random_scene, render
    from dalle_repro.demo.report import zero_shot_section
    from dalle_repro.evaluation.evaluate import CandidateSet, candidate_report

    scenes = [random_scene(np.random.default_rng(k), False) for k in range(4)]
    ims = torch.stack([torch.from_numpy(np.array(render(s, 32, seed=0))).permute(2, 0, 1) for s in scenes])
    wrong = ims.roll(1, 0)
    rep = candidate_report(
        CandidateSet([s.caption() for s in scenes], torch.stack([wrong, ims], 1), torch.tensor([[0.9, 0.1]] * 4)),
        attributes=True,
    ) | {"fd_clip": 0.1}
    md = "\n".join(zero_shot_section({"splits": {"seen": rep}}))
    assert "| ceiling: reader's pick |" in md
    row = next(line for line in md.splitlines() if line.startswith("| seen (4 x 2)"))
    assert row.split(" | ")[4].startswith("100.0%")  # the right render is there, though CLIP scored it lower
    assert "unlabelled" not in md and "never occurs in training" in md
    pooled = "\n".join(zero_shot_section({"splits": {"seen": rep}}, {"folder": "unlabelled", "scenes": 40000}))
    assert "The dVAE trained on 40000 unlabelled scenes of every pair, held-out ones included" in pooled
    del rep["tasks"]["reader_pick"]
    assert "not recorded" in "\n".join(zero_shot_section({"splits": {"seen": rep}}))
