"""The demo's configs and its time plan: less training where this machine is slow."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from dalle_repro.core.config import ConfigError, from_dict, load_config
from dalle_repro.demo import pipeline as demo
from dalle_repro.demo import plan as demo_plan


@pytest.fixture
def cfg():
    return load_config(demo.DemoConfig, "configs/demo/demo.yaml", [])


def test_the_fraction_fits_the_budget_and_only_ever_shortens():
    assert demo_plan.fraction_to_fit({"a": 5.0, "b": 10.0}, 20.0) == 1.0
    assert demo_plan.fraction_to_fit({"a": 10.0, "b": 30.0}, 20.0) == 0.5
    assert demo_plan.fraction_to_fit({"a": 10.0, "b": 30.0}, None) == 1.0
    assert demo_plan.fraction_to_fit({"a": 1000.0}, 20.0) == demo_plan.MIN_FRACTION


def _plan(cfg, tmp_path, fraction):
    """A plan.json as stage_plan writes it, for ``fraction`` of the shipped configs."""
    cfg.out_dir = str(tmp_path)
    configs = {
        "dvae": demo.dvae_config(cfg, plan=False),
        "prior": demo.prior_config(cfg, plan=False),
        "clip": demo.clip_config(cfg, plan=False),
    }
    overrides = {k: demo_plan.scaled_overrides(c, demo_plan.SCALED_KEYS[k], fraction) for k, c in configs.items()}
    demo.plan_path(cfg).write_text(json.dumps({"fraction": fraction, "overrides": overrides}))
    return configs


def test_a_plan_shortens_every_stage_and_its_schedules_alike(cfg, tmp_path):
    full = _plan(cfg, tmp_path, 0.5)
    d, p, c = demo.dvae_config(cfg), demo.prior_config(cfg), demo.clip_config(cfg)
    fd, fp = full["dvae"], full["prior"]
    assert d.run.steps == fd.run.steps // 2 and d.schedule.lr_steps == fd.schedule.lr_steps // 2
    assert d.schedule.tau_steps == fd.schedule.tau_steps // 2 and d.run.val_every == fd.run.val_every // 2
    assert p.run.steps == fp.run.steps // 2 and p.schedule.warmup_steps == fp.schedule.warmup_steps // 2
    assert c.run.steps == full["clip"].run.steps // 2
    assert d.model == fd.model and p.model == fp.model and d.data == fd.data  # only lengths change


def test_a_machine_fast_enough_keeps_the_configured_runs(cfg, tmp_path):
    full = _plan(cfg, tmp_path, 1.0)
    assert demo.dvae_config(cfg) == full["dvae"] and demo.prior_config(cfg) == full["prior"]
    assert demo.clip_config(cfg) == full["clip"]


def test_the_plan_scales_the_users_overrides_alike(tmp_path):
    """Overrides are planned too, so a run shortened by the plan keeps its schedules in proportion."""
    mine = load_config(
        demo.DemoConfig,
        "configs/demo/demo.yaml",
        ["dvae_overrides=[run.steps=800,schedule.lr_steps=800]", "prior_overrides=[run.steps=6]"],
    )
    _plan(mine, tmp_path, 0.5)
    d = demo.dvae_config(mine)
    assert d.run.steps == 400 and d.schedule.lr_steps == 400 and demo.prior_config(mine).run.steps == 3
    mine.train_minutes = None  # without a plan file the overrides are trained as they are
    demo.plan_path(mine).unlink()
    assert demo.dvae_config(mine).run.steps == 800


def test_a_zero_length_schedule_stays_zero():
    assert demo_plan.scaled(0, 0.5) == 0 and demo_plan.scaled(None, 0.5) is None and demo_plan.scaled(3, 0.1) == 1


def test_an_unreadable_plan_is_named(cfg, tmp_path):
    cfg.out_dir = str(tmp_path)
    demo.plan_path(cfg).write_text('{"fraction": 0.5, "overrides": {"dvae": [')  # torn
    with pytest.raises(ConfigError, match="plan.json: unreadable time plan"):
        demo.dvae_config(cfg)
    assert demo.dvae_config(cfg, plan=False).run.steps > 0  # the plan stage's own settings still load
    assert demo.prior_config(cfg, plan=False).dvae.endswith("dvae/dvae")


def test_a_plan_file_sets_no_override_of_its_own(cfg, tmp_path, monkeypatch):
    """plan.json sits in the output folder, which may come from someone else: the overrides it
    records (any key, a pipe: shard, an environment variable) are not applied; only its fraction is
    read, in bounds, and the update counts are recomputed from it."""
    monkeypatch.setenv("DALLE_REPRO_TEST_SECRET", "s3cret")
    full = _plan(cfg, tmp_path, 0.5)
    plan = json.loads(demo.plan_path(cfg).read_text())
    plan["overrides"]["dvae"] += [f"data.shards=pipe:touch {tmp_path / 'ran'}", "log.wandb=true"]
    plan["overrides"]["prior"] += ["log.wandb_project=${oc.env:DALLE_REPRO_TEST_SECRET}", "run.steps=99999"]
    plan["overrides"]["clip"] += ["run.steps=99999"]
    demo.plan_path(cfg).write_text(json.dumps(plan))
    d, p, c = demo.dvae_config(cfg), demo.prior_config(cfg), demo.clip_config(cfg)
    assert d.data.shards == full["dvae"].data.shards and not d.log.wandb
    assert p.log.wandb_project == full["prior"].log.wandb_project and p.run.steps == full["prior"].run.steps // 2
    assert c.run.steps == full["clip"].run.steps // 2
    for bad in (7.0, 0.0, "0.5", None):
        demo.plan_path(cfg).write_text(json.dumps(plan | {"fraction": bad}))
        with pytest.raises(ConfigError, match="plan.json: unreadable time plan"):
            demo.dvae_config(cfg)


def test_a_rerun_keeps_the_timings_whose_subject_did_not_change(cfg, tmp_path, monkeypatch):
    """Rerunning the plan (another setting changed) must not move the fraction by timing noise."""
    cfg.out_dir = str(tmp_path)
    calls = []

    def timer(name, seconds):
        def run(*a, **k):
            calls.append(name)
            return seconds

        return run

    monkeypatch.setattr(demo, "TextTokenizer", lambda *a: type("T", (), {"vocab_size": 100})())
    monkeypatch.setattr(demo_plan, "dvae_step_seconds", timer("dvae", 0.5))
    monkeypatch.setattr(demo_plan, "prior_step_seconds", timer("prior", 1.0))
    monkeypatch.setattr(demo_plan, "clip_step_seconds", timer("clip", 0.2))
    first = demo.stage_plan(cfg)
    assert 0 < first["fraction"] < 1 and calls == ["dvae", "prior", "clip"]
    monkeypatch.setattr(demo_plan, "dvae_step_seconds", timer("dvae", 0.9))  # noise, were it timed again
    cfg.clip.optim.lr = 0.002  # a setting no timing depends on
    assert demo.stage_plan(cfg)["fraction"] == first["fraction"] and calls == ["dvae", "prior", "clip"]
    cfg.clip.data.batch_size = 32  # what the CLIP timer measures: timed again, the others kept
    demo.stage_plan(cfg)
    assert calls == ["dvae", "prior", "clip", "clip"]


def test_the_plan_uses_the_factors_of_the_dtype_each_stage_trains_in(cfg, tmp_path, monkeypatch):
    """An fp32 prior (no native bf16) has its own factor: bf16's over-predicted it by a fifth."""
    bf16, fp32 = demo_plan.STAGE_FACTORS["prior"], demo_plan.STAGE_FACTORS_FP32["prior"]
    assert demo_plan.stage_factors({"prior": "bf16"}) == demo_plan.STAGE_FACTORS
    assert demo_plan.stage_factors({"prior": "fp32"})["prior"] == fp32 < bf16
    monkeypatch.setattr(demo, "TextTokenizer", lambda *a: type("T", (), {"vocab_size": 100})())
    monkeypatch.setattr(demo_plan, "dvae_step_seconds", lambda *a, **k: 0.5)
    monkeypatch.setattr(demo_plan, "prior_step_seconds", lambda *a, **k: 1.0)
    monkeypatch.setattr(demo_plan, "clip_step_seconds", lambda *a, **k: 0.2)
    plans = {}
    for dtype in ("bf16", "fp32"):
        cfg.out_dir = str(tmp_path / dtype)
        monkeypatch.setattr(demo_plan, "picked_dtype", lambda requested, d=dtype: d)
        plans[dtype] = demo.stage_plan(cfg)
        assert plans[dtype]["dtypes"] == {"dvae": dtype, "prior": dtype, "clip": dtype}
    assert plans["bf16"]["factors"]["prior"] == bf16 and plans["fp32"]["factors"]["prior"] == fp32
    minutes = {d: p["predicted_minutes_configured"]["prior"] for d, p in plans.items()}
    assert minutes["fp32"] == pytest.approx(minutes["bf16"] * fp32 / bf16, abs=0.01)
    assert plans["fp32"]["fraction"] >= plans["bf16"]["fraction"]


def test_a_failing_prior_timer_raises_instead_of_reading_zero(monkeypatch):
    from dalle_repro.models.transformer import Transformer

    def broken(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(Transformer, "loss", broken)
    from dalle_repro.models.transformer import TransformerArgs

    m = TransformerArgs(dim=32, depth=2, heads=2, conv_kernel=3, text_len=4, text_vocab=40, grid=4, image_vocab=16)
    with pytest.raises(RuntimeError, match="timing the prior's update failed"):
        demo_plan.prior_step_seconds(m, "fp32", batch=2, ranks=2, warm=1, timed=1)


def test_the_step_timers_run_the_real_steps_at_a_tiny_size():
    """Each timer returns a positive time per update for the demo's own model code."""
    tiny = ["dvae_overrides=[model.image_size=16,model.n_hid=8,model.vocab_size=32,data.batch_size=2]"]
    cfg = load_config(demo.DemoConfig, "configs/demo/demo.yaml", tiny)
    d = demo.dvae_config(cfg, plan=False)
    assert demo_plan.dvae_step_seconds(d, warm=1, timed=1) > 0
    p = demo.prior_config(cfg, plan=False)
    from dataclasses import replace

    m = replace(p.model, dim=32, depth=2, heads=2, conv_kernel=3, text_len=4, text_vocab=40, grid=4, image_vocab=16)
    assert demo_plan.prior_step_seconds(m, "fp32", batch=2, ranks=2, warm=1, timed=1) > 0


def test_the_emoji_demo_stays_an_option():
    emoji = load_config(demo.DemoConfig, "configs/demo/emoji.yaml", [])
    assert emoji.dataset == "emoji" and demo.data_dir(emoji).as_posix() == "data/emoji"
    assert demo.dvae_config(emoji).data.shards == "data/emoji/train/*.tar"
    assert demo.prior_config(emoji).data.shards == "data/emoji_tokens/train/*.tar"


def test_the_default_demo_is_the_shapes_set(cfg):
    assert cfg.dataset == "shapes" and demo.data_dir(cfg).as_posix() == "data/shapes"
    d, p = demo.dvae_config(cfg), demo.prior_config(cfg)
    # the dVAE on the unlabelled scenes of every pair, validated on seen ones; the prior on seen pairs alone
    assert d.data.shards == "data/shapes/unlabelled/*.tar" and d.run.val_shards == "data/shapes/val/*.tar"
    assert p.data.shards == "data/shapes_tokens/train/*.tar" and p.text.text_len == cfg.text.text_len
    assert "--heldout 'data/shapes/heldout/*.tar'" in demo.evaluate_command(cfg)


def test_reranking_against_the_training_captions_names_the_demos_own_shards(cfg):
    """``rerank_against_train`` points the samples' and the evaluation's reference at the data set's
    training shards (the report's command says so); a reference set by hand wins; off: none."""
    on = load_config(demo.DemoConfig, "configs/demo/demo.yaml", ["rerank_against_train=true"])
    assert demo.with_reference(on, on.sample).rerank_reference == "data/shapes/train/*.tar"
    assert "--rerank-reference 'data/shapes/train/*.tar'" in demo.evaluate_command(on)
    own = load_config(
        demo.DemoConfig, "configs/demo/demo.yaml", ["rerank_against_train=true", "sample.rerank_reference=x/*.tar"]
    )
    assert demo.with_reference(own, own.sample).rerank_reference == "x/*.tar"
    off = load_config(demo.DemoConfig, "configs/demo/demo.yaml", ["rerank_against_train=false"])
    assert demo.with_reference(off, off.evaluation.sample).rerank_reference is None
    assert "--rerank-reference" not in demo.evaluate_command(off)
    evaluate = next(s for s in demo.stages() if s.name == "evaluate")
    assert evaluate.settings(on) != evaluate.settings(off)  # switching it reruns the evaluation


def test_with_cuda_the_plan_keeps_the_configured_runs(cfg, tmp_path, monkeypatch):
    """The timers run CPU paths, so on a GPU machine the plan must not shorten anything."""
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: True)
    cfg.out_dir = str(tmp_path)
    plan = demo.stage_plan(cfg)
    assert plan["fraction"] == 1.0 and all(not o for o in plan["overrides"].values()) and "CUDA" in plan["note"]
    assert demo.dvae_config(cfg) == demo.dvae_config(cfg, plan=False)


def test_the_demo_replaces_only_folders_it_made(tmp_path, monkeypatch):
    """out_dir pointed at an existing folder: a settings change rmtree'd RUN/dvae with its
    checkpoints, and the shapes and tokens stages overwrote a user's NNNNN.tar."""
    mine = tmp_path / "mine"
    step = mine / "dvae" / "checkpoints" / "step_00000100"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (mine / "dvae" / "config.yaml").write_text("run:\n  steps: 5\n")
    cfg = from_dict(demo.DemoConfig, {"out_dir": str(mine), "shapes": {"output": str(mine), "train": 20, "heldout": 4}})
    monkeypatch.setattr(demo, "train_dvae", lambda *a, **k: pytest.fail("trained into a user's folder"))
    with pytest.raises(ConfigError, match=f"{mine / 'dvae'} exists and was not made by the demo"):
        demo.stage_dvae(cfg)
    assert (step / "state.json").is_file()
    (mine / "00000.tar").write_bytes(b"the user's shard")
    with pytest.raises(ConfigError, match=f"{mine} exists and was not made by the demo"):
        demo.stage_data(cfg)
    assert (mine / "00000.tar").read_bytes() == b"the user's shard"
    cfg.tokens_output = str(mine)
    with pytest.raises(ConfigError, match="not made by the demo"):
        demo.stage_tokens(cfg)
    with pytest.raises(ConfigError, match="not made by the demo"):
        demo.run_demo(cfg, log=lambda _: None)
    assert not (mine / "config.yaml").exists() and (mine / "00000.tar").read_bytes() == b"the user's shard"
    ours = demo.claim(tmp_path / "new")  # a folder the demo creates is its own from then on
    (ours / "00000.tar").write_bytes(b"ours")
    assert demo.claim(ours) == ours


def test_the_report_escapes_captions_and_inlines_only_pngs_inside_its_folder(tmp_path):
    """Captions went raw into report.md (live HTML in some viewers); report.html inlined any file a
    stage marker named, and crashed on a missing one."""
    import base64

    from dalle_repro.core.images import save_png
    from dalle_repro.demo.report import write_report

    out = tmp_path / "out"
    out.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"SECRET KEY")
    (out / "notes.png").write_bytes(b"not a png, and the report's own folder")
    from PIL import Image

    ours = save_png(Image.new("RGB", (4, 4), "red"), out / "samples" / "00-train.png")
    caption = '<script>alert("x")</script> [click](http://evil) ```'
    prompts = [
        {"caption": caption, "split": "train", "grid": str(ours)},
        {"caption": "gone", "split": "new", "grid": str(out / "samples" / "missing.png")},
        {"caption": "outside", "split": "new", "grid": str(secret)},
        {"caption": "not a png", "split": "new", "grid": str(out / "notes.png")},
    ]
    results = {"samples": {"prompts": prompts}}
    write_report(out, results, {"samples": {"settings": {"captions_train": [caption]}}})
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "<script>" not in md and "](http://evil)" not in md.split("```json")[0]  # a code block shows links
    assert md.count("```") == 2  # the settings' fence only: the caption's backticks cannot close it
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert base64.b64encode(secret.read_bytes()).decode() not in page and page.count("data:image/png") == 1
    assert page.count("picture not shown") == 3


def test_the_plan_times_an_update_by_the_median_so_one_slow_call_does_not_move_it(monkeypatch):
    clock = iter([0.0, 1.0, 1.0, 11.0, 11.0, 12.0, 12.0, 13.0, 13.0, 14.0])  # the second call takes 10 s
    monkeypatch.setattr(demo_plan.time, "perf_counter", lambda: next(clock))
    calls = []
    assert demo_plan._timed(lambda: calls.append(1), warm=2, timed=5) == 1.0  # a mean would say 2.8
    assert len(calls) == 7


def test_each_training_stage_may_use_what_the_budget_has_left(cfg, tmp_path, monkeypatch):
    """stage_end_by: the budget less the stages run before (their markers) and the plan's prediction
    for the stages after; never less than MIN_FRACTION of the stage's own prediction."""
    cfg.out_dir, cfg.train_minutes = str(tmp_path), 20
    plan = {"fraction": 0.5, "predicted_minutes_configured": {"dvae": 12.0, "prior": 16.0, "clip": 4.0}}
    demo.plan_path(cfg).write_text(json.dumps(plan))
    monkeypatch.setattr(demo.time, "time", lambda: 1000.0)
    # before any stage: the dVAE may use 20 - 8 (prior) - 2 (clip) minutes
    assert demo.stage_end_by(cfg, "dvae") == 1000 + (20 - 8 - 2) * 60
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "dvae.json").write_text(json.dumps({"seconds": 9 * 60}))  # 3 minutes over its 6
    assert demo.stage_end_by(cfg, "prior") == 1000 + (20 - 9 - 2) * 60
    (tmp_path / "stages" / "prior.json").write_text(json.dumps({"seconds": 17.5 * 60}))  # far over
    assert demo.stage_end_by(cfg, "clip") == 1000 + demo_plan.MIN_FRACTION * 2 * 60
    cfg.train_minutes = None
    assert demo.stage_end_by(cfg, "clip") is None  # no budget: the configured runs


def test_a_run_folder_continues_when_only_its_length_or_deadline_changed(cfg, tmp_path):
    from dalle_repro.core.config import save_config

    c = demo.clip_config(cfg, plan=False)
    c.run.end_by = 1.0e9
    save_config(c, tmp_path)
    again = demo.clip_config(cfg, plan=False)
    again.run.steps, again.run.end_by = 17, 2.0e9
    assert demo._same_run(tmp_path / "config.yaml", again)
    again.run.seed = 5
    assert not demo._same_run(tmp_path / "config.yaml", again)


def test_a_stop_in_a_training_stage_ends_the_demo_with_where_to_continue(cfg, tmp_path, monkeypatch):
    """SIGTERM/SIGINT (the command installs StopRequested): the stage's trainer ended with a
    checkpoint; the demo stops there instead of starting the next stage on a missing model."""
    from dalle_repro.train.loop import StopRequested

    cfg.out_dir, cfg.train_minutes = str(tmp_path), None
    cfg.dvae_overrides = [f"run.run_dir={tmp_path}/dvae"]
    monkeypatch.setattr(demo, "train_dvae", lambda c, resume_run, stop: {"step": 3, "ended": "signal"})
    stop = StopRequested()
    token = demo.STOP.set(stop)
    try:
        with pytest.raises(demo.DemoStopped, match="stopped in the dvae stage .* run the same command again"):
            demo.stage_dvae(cfg)
    finally:
        demo.STOP.reset(token)


def test_the_priors_launcher_gets_sigterm_when_the_demo_is_stopped(tmp_path):
    """_launch: the launcher runs in its own process group, and the demo's stop sends SIGTERM to it
    (as the ranks' handlers want: end the update, write a checkpoint, exit 0)."""
    import sys

    from dalle_repro.train.loop import StopRequested

    child = tmp_path / "child.py"
    child.write_text(
        "import signal, sys, time, pathlib\n"
        f"def bye(*_):\n    pathlib.Path({str(tmp_path / 'got')!r}).write_text('SIGTERM'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
        "time.sleep(60)\n"
    )
    stop = StopRequested()
    token = demo.STOP.set(stop)
    try:
        import threading

        def later():
            while not (tmp_path / "ready").exists():
                time.sleep(0.05)
            stop.signal = "SIGTERM"

        threading.Thread(target=later, daemon=True).start()
        with open(tmp_path / "log", "w") as logf:
            code, stopped = demo._launch([sys.executable, str(child)], logf, dict(os.environ))
    finally:
        demo.STOP.reset(token)
    assert (code, stopped) == (0, True) and (tmp_path / "got").read_text() == "SIGTERM"


def test_a_collapsed_demo_dvae_goes_back_to_its_last_healthy_checkpoint_and_clips(cfg, tmp_path, monkeypatch):
    """The demo's dVAE collapsed after its validation at 465: the demo deletes the later checkpoints,
    and resumes from 465 with optim.grad_clip=1.0 (once: a clipped run that collapses stops)."""
    from dalle_repro.train.dvae import CodebookCollapsed

    cfg.out_dir, cfg.train_minutes = str(tmp_path), None
    run = tmp_path / "dvae"
    cfg.dvae_overrides = [f"run.run_dir={run}"]
    demo.claim(run)  # the demo's own folder
    for step in (465, 930):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step:08d}" / "state.json").write_text("{}")
    rows = [{"step": 465, "val_codes_used": 326}, {"step": 930, "val_codes_used": 1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    def train(c, resume_run, stop):
        calls.append((c.optim.grad_clip, resume_run, sorted(p.name for p in (run / "checkpoints").iterdir())))
        if len(calls) == 1 or c.optim.grad_clip is None:
            raise CodebookCollapsed("collapsed at 930")
        return {"step": 3800, "ended": "done", "val_codes_used": 300}

    monkeypatch.setattr(demo, "train_dvae", train)
    monkeypatch.setattr(demo, "_same_run", lambda *a: True)
    out = demo.stage_dvae(cfg)
    assert calls[1] == (1.0, True, ["step_00000465"])  # resumed from 465, clipped
    assert out["rolled_back_to"] == "step_00000465" and out["grad_clip_from_there"] == 1.0
    cfg.dvae_overrides = [f"run.run_dir={run}", "optim.grad_clip=0.5"]  # clipped already: no second try
    calls.clear()
    with pytest.raises(CodebookCollapsed):
        demo.stage_dvae(cfg)
    assert len(calls) == 1


def test_a_changed_setting_reruns_its_stage_and_what_reads_it_and_nothing_else(cfg, tmp_path):
    """The stage fingerprints of two configs, as _run_stages computes them: another tokenizer
    vocabulary changes the tokenizer and every stage that reads it, not the data, the dVAE or its
    tokens; another evaluation setting changes only the evaluation."""
    cfg.out_dir = str(tmp_path)

    def fingerprints(c):
        done: dict[str, str] = {}
        for stage in demo.stages():
            done[stage.name] = demo.stage_fingerprint(stage, c, done)
        return done

    base = fingerprints(cfg)
    other = dataclasses.replace(cfg, bpe=dataclasses.replace(cfg.bpe, vocab_size=280))
    changed = {k for k, v in fingerprints(other).items() if v != base[k]}
    assert changed == {"tokenizer", "preview", "plan", "prior", "clip", "samples", "evaluate"}
    other = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, pictures=2))
    assert {k for k, v in fingerprints(other).items() if v != base[k]} == {"evaluate"}
    # another pool for the dVAE: the data (so everything after it), and the dVAE's own config
    other = dataclasses.replace(cfg, shapes=dataclasses.replace(cfg.shapes, unlabelled=0))
    assert demo.dvae_config(other).data.shards != demo.dvae_config(cfg).data.shards
    assert {k for k, v in fingerprints(other).items() if v != base[k]} == set(base)


def test_a_training_stage_continues_only_a_run_of_the_same_config_and_inputs(tmp_path):
    """A prior's config names its token folder, not the dVAE that wrote the tokens: a run trained
    from other inputs (the fingerprints of the stages it reads) starts again, config unchanged."""
    from dalle_repro.core.config import save_config
    from dalle_repro.demo.pipeline import INPUTS, INPUTS_FILE, _continues
    from dalle_repro.train.clip import ClipTrainConfig

    run = tmp_path / "run"
    c = ClipTrainConfig()
    c.run.run_dir = str(run)

    def trained(inputs: str) -> None:
        token = INPUTS.set(inputs)
        try:
            assert not _continues(run, c)  # nothing to continue: a fresh folder, inputs recorded
        finally:
            INPUTS.reset(token)
        (run / "checkpoints" / "step_00000010").mkdir(parents=True)
        (run / "checkpoints" / "step_00000010" / "state.json").write_text("{}")
        save_config(c, run)

    trained("a")
    for inputs, expected in (("a", True), ("b", False)):
        token = INPUTS.set(inputs)
        try:
            assert _continues(run, c) is expected, inputs
        finally:
            INPUTS.reset(token)
        assert json.loads((run / INPUTS_FILE).read_text()) == {"inputs": inputs}
        assert (run / "checkpoints").is_dir() is expected  # another input's run is gone
        if not expected:
            trained("b")
    other = dataclasses.replace(c, optim=dataclasses.replace(c.optim, lr=c.optim.lr / 2))
    token = INPUTS.set("b")
    try:
        assert not _continues(run, other)  # another config, as before
    finally:
        INPUTS.reset(token)
