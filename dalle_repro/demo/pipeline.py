"""The main job on the embedded demo data, as resumable stages.

Each stage writes its outputs, then a marker ``OUT/stages/NAME.json`` holding a fingerprint of its
settings and of the stages it reads from. A stage whose marker matches (and whose outputs exist) is
skipped, so rerunning after an interruption continues at the first unfinished stage, and changing
a stage's settings reruns it and the stages that read its output. An interrupted dVAE run resumes
from its last checkpoint.

Stages: the data set (shapes, strokes or emoji shards), the tokenizer, a look at one loader batch (a preview
image), the time plan (demo_plan: how much of the configured training fits ``train_minutes`` on this
machine), the demo dVAE (with its reconstruction grid), the token shards, the demo prior, trained by
launch/train_prior.py under the ``deepspeed`` launcher with 2 CPU ranks (an interrupted run resumes
from its last checkpoint), the small CLIP, reranked samples and the zero-shot evaluation.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from dalle_repro.core.config import (
    PIPE_FLAG,
    load_yaml,
    save_config,
    to_dict,
)
from dalle_repro.core.distributed import free_port, usable_cores
from dalle_repro.core.files import atomic_write_text
from dalle_repro.core.images import grid, save_png
from dalle_repro.core.precision import denormals_flushed
from dalle_repro.data.emoji import build_emoji_from
from dalle_repro.data.loader import Loader
from dalle_repro.data.pre_encode import encode_token_shards
from dalle_repro.data.samples import clean_caption
from dalle_repro.data.shapes import UNLABELLED, ShapesArgs
from dalle_repro.data.tar import iter_shard_samples
from dalle_repro.data.tokenizer import TextTokenizer, save_tokenizer, train_from_shards
from dalle_repro.demo.config import (
    ALLOW_PIPE,
    SCENES,
    DemoConfig,
    claim,
    clip_config,
    data_args,
    data_dir,
    dvae_config,
    dvae_images,
    plan_path,
    prior_config,
    read_plan,
)
from dalle_repro.demo.report import write_report
from dalle_repro.evaluation.evaluate import zero_shot
from dalle_repro.sample.export import load_prior
from dalle_repro.sample.generate import SampleSettings, generate
from dalle_repro.sample.rerank import Reranker
from dalle_repro.train.checkpoint import Checkpoints
from dalle_repro.train.clip import clip_folder, train_clip
from dalle_repro.train.dvae import CodebookCollapsed
from dalle_repro.train.dvae import train as train_dvae
from dalle_repro.train.loop import StopRequested
from dalle_repro.train.metrics import last_validation, read_metrics
from dalle_repro.train.prior_config import resolve_sizes

log = logging.getLogger(__name__)

# The command's SIGTERM/SIGINT (cli/demo.py installs it): a training stage stops with a checkpoint.
STOP: contextvars.ContextVar[StopRequested | None] = contextvars.ContextVar("demo_stop", default=None)


class DemoStopped(Exception):
    """SIGTERM or SIGINT stopped the demo: the training stage it was in wrote a checkpoint, and the
    same command continues from it (finished stages are skipped)."""


def _stopped(stage: str, run_dir: str | Path) -> DemoStopped:
    latest = Checkpoints(run_dir).latest()
    where = f"its checkpoint is {latest}" if latest is not None else "it had not trained an update yet"
    return DemoStopped(f"stopped in the {stage} stage ({where}); run the same command again to continue")


def _raise_if_stopped(stage: str, run_dir: str | Path, result: dict[str, Any]) -> None:
    """An in-process trainer's result that says SIGTERM/SIGINT ended it: stop the demo there."""
    if result.get("ended") in ("signal", "signal_before_training"):
        raise _stopped(stage, run_dir)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_data(cfg: DemoConfig) -> dict[str, Any]:
    if cfg.dataset in SCENES:
        a = data_args(cfg)
        assert isinstance(a, ShapesArgs)
        claim(a.output)  # the demo's own folder: marked as such, or refused when it is someone else's
        s = SCENES[cfg.dataset](a, overwrite=True)
        pool = {"unlabelled": s["unlabelled"]} if "unlabelled" in s else {}
        return {"world": cfg.dataset, "written": s["written"], "splits": s["splits"], "heldout": s["heldout"]} | pool
    s = build_emoji_from(cfg.emoji)
    return {"written": s["written"], "skipped": s["skipped"], "splits": s["splits"], "fingerprint": s["fingerprint"]}


def stage_tokenizer(cfg: DemoConfig) -> dict[str, Any]:
    paths = sorted(str(p) for p in (data_dir(cfg) / "train").glob("*.tar"))
    tok, stats = train_from_shards(paths, cfg.bpe.vocab_size, cfg.bpe.min_frequency)
    save_tokenizer(tok, cfg.text.path)
    return stats | {"path": cfg.text.path}


def stage_preview(cfg: DemoConfig) -> dict[str, Any]:
    """One batch through the real loader and tokenizer, drawn with its decoded captions."""
    tok = TextTokenizer(cfg.text.path, cfg.text.text_len)
    size = data_args(cfg).image_size
    data = dataclasses.replace(cfg.data, shards=f"{data_dir(cfg)}/train/*.tar", image_size=cfg.data.image_size or size)
    loader = Loader(data.shards, data, tok, text_dropout=cfg.text.dropout)
    batch = next(iter(loader))
    n, size = len(batch["key"]), loader.args.image_size
    sheet = Image.new("RGB", (n * (size + 8), size + 40), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        im = Image.fromarray(batch["image"][i].permute(1, 2, 0).numpy())
        sheet.paste(im, (i * (size + 8), 0))
        draw.text((i * (size + 8), size + 4), tok.decode(batch["text"][i])[:14], fill="black")
    path = Path(cfg.out_dir, "data_preview.png")
    sheet.save(path)
    return {
        "image": list(batch["image"].shape),
        "text": list(batch["text"].shape),
        "text_vocab": tok.vocab_size,
        "captions": batch["caption"],
        "preview": str(path),
    }


# The fingerprint of the outputs a training stage reads (those of the stages in its ``after``), set by
# _run_stages while the stage runs. A run folder trained from other inputs starts again even where
# its own config is unchanged: a prior whose config names the same token folder, over the tokens of
# a dVAE trained since on other images, must not continue.
INPUTS: contextvars.ContextVar[str | None] = contextvars.ContextVar("demo_inputs", default=None)
INPUTS_FILE = "demo_inputs.json"


def _continues(run_dir: Path, cfg: Any, own: bool = True) -> bool:
    """Whether a training stage continues the run in ``run_dir``: it has a checkpoint, its config
    equals ``cfg`` apart from length and deadline, and it was trained from the same inputs
    (:data:`INPUTS`, where set). Otherwise the folder, the demo's own, is emptied (``own``: and
    claimed again). The inputs are recorded in it either way."""
    inputs, saved = INPUTS.get(), run_dir / INPUTS_FILE
    same_inputs = inputs is None or (saved.is_file() and json.loads(saved.read_text()).get("inputs") == inputs)
    resume = Checkpoints(run_dir).latest() is not None and _same_run(run_dir / "config.yaml", cfg) and same_inputs
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    if own:
        claim(run_dir)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    if inputs is not None:
        atomic_write_text(saved, json.dumps({"inputs": inputs}) + "\n")
    return resume


def _same_run(saved: Path, cfg: Any) -> bool:
    """Whether a run folder's config equals ``cfg`` apart from its length and deadline (so it may continue)."""
    if not saved.is_file():
        return False
    old, new = load_yaml(saved), to_dict(cfg)
    for key in ("steps", "end_by"):
        old.get("run", {}).pop(key, None)
        new["run"].pop(key, None)
    return old == new


TRAINING = ("dvae", "prior", "clip")  # the training stages, in the order they run


def stage_end_by(cfg: DemoConfig, stage: str) -> float | None:
    """The Unix time by which a training stage should end (its ``run.end_by``: the run times its own
    updates and fits its length to it, train/loop.py's LengthPlan).

    The plan's timers predict each stage before any trains, and on some machines they miss (the
    prior's real updates cost 1.4-1.9x its timer on one CPU, docs/demo.md); so each stage may use
    what the budget has left after the stages before it (their markers' seconds), less what the plan
    predicted for the stages after it, and no less than MIN_FRACTION of its own prediction. None
    without a budget or without the plan's timings (CUDA)."""
    from dalle_repro.demo import plan as dp

    plan = read_plan(plan_path(cfg))
    if cfg.train_minutes is None or not plan or "predicted_minutes_configured" not in plan:
        return None
    predicted = {k: v * plan["fraction"] * 60 for k, v in plan["predicted_minutes_configured"].items()}
    i = TRAINING.index(stage)
    used = 0.0
    for before in TRAINING[:i]:
        marker = Path(cfg.out_dir, "stages", f"{before}.json")
        used += float(json.loads(marker.read_text()).get("seconds") or 0) if marker.is_file() else predicted[before]
    left = cfg.train_minutes * 60 - used - sum(predicted[k] for k in TRAINING[i + 1 :])
    return time.time() + max(left, dp.MIN_FRACTION * predicted[stage])


def length_plan(run_dir: str | Path) -> dict[str, Any]:
    """What a run's ``run.end_by`` did (final_metrics.json): the configured and planned lengths, the
    changes, how long before its deadline it ended, its own forecast's error."""
    path = Path(run_dir, "final_metrics.json")
    final = load_yaml(path) if path.is_file() else {}
    keys = ("configured_steps", "planned_steps", "length_changes", "ended_before_end_by_s", "forecast")
    return {k: final[k] for k in keys if k in final}


def stage_dvae(cfg: DemoConfig) -> dict[str, Any]:
    dcfg = dvae_config(cfg)
    dcfg.run.end_by = stage_end_by(cfg, "dvae")
    run_dir = claim(dcfg.run.run_dir)
    resume = _continues(run_dir, dcfg)
    rollback: dict[str, Any] = {}
    try:
        trained = train_dvae(dcfg, resume_run=resume, stop=STOP.get())
    except CodebookCollapsed as e:
        healthy = last_healthy_checkpoint(run_dir, dcfg.loss.collapse_codes)
        if dcfg.optim.grad_clip is not None or healthy is None:
            raise
        log.warning(
            "%s\nThe demo goes back to %s (its last validation before the collapse) and trains on from there "
            "with optim.grad_clip=%g",
            e,
            healthy,
            ROLLBACK_CLIP,
        )
        for later in Checkpoints(run_dir).all():
            if Checkpoints.step_of(later) > Checkpoints.step_of(healthy):
                shutil.rmtree(later)
        end_by = dcfg.run.end_by
        dcfg = dvae_config(cfg)  # afresh: the first run's LengthPlan shortened its copy in place
        dcfg.run.end_by, dcfg.optim.grad_clip = end_by, ROLLBACK_CLIP
        rollback = {"collapsed": str(e), "rolled_back_to": healthy.name, "grad_clip_from_there": ROLLBACK_CLIP}
        trained = train_dvae(dcfg, resume_run=True, stop=STOP.get())
    _raise_if_stopped("dvae", run_dir, trained)
    val = trained or last_validation(run_dir, "val_psnr")
    return (
        val
        | length_plan(run_dir)
        | rollback
        | {
            "model": f"{dcfg.run.run_dir}/dvae",
            "grid": f"{dcfg.run.run_dir}/recon_latest.png",
            "run_dir": dcfg.run.run_dir,
            "vocab_size": dcfg.model.vocab_size,
            "trained_on": trained_on(cfg),
        }
    )


def trained_on(cfg: DemoConfig) -> dict[str, Any]:
    """What the demo's dVAE trains on: its folder in the data set, and the scenes an unlabelled pool holds."""
    folder = dvae_images(cfg)
    if folder != UNLABELLED:
        return {"folder": folder}
    summary, a = data_dir(cfg) / folder / "summary.json", data_args(cfg)
    assert isinstance(a, ShapesArgs)  # dvae_images gives the pool for the scene sets alone
    return {
        "folder": folder,
        "scenes": json.loads(summary.read_text())["written"] if summary.is_file() else a.unlabelled,
    }


# A demo dVAE that collapsed goes back to its last healthy checkpoint and trains on with its gradient
# norm clipped to this: resumed from update 500 of the run that collapsed at ~510 on 2026-12-05 (Intel
# Xeon), the unclipped run fell to 1 code by update 540 again, clipped at 1.0 (or with half the
# learning rate) it kept 69-129 codes per batch to update 600 (docs/demo.md, "Stages that plan
# themselves, and a dVAE that collapsed").
ROLLBACK_CLIP = 1.0


def last_healthy_checkpoint(run_dir: Path, limit: int) -> Path | None:
    """The newest checkpoint of a dVAE run written no later than its last validation whose
    reconstructions used more than ``limit`` codes (None without one)."""
    healthy = [r["step"] for r in read_metrics(run_dir) if r.get("val_codes_used", 0) > limit]
    if not healthy:
        return None
    done = [p for p in Checkpoints(run_dir).all() if (p / "state.json").is_file()]
    before = [p for p in done if Checkpoints.step_of(p) <= max(healthy)]
    return before[-1] if before else None


def stage_tokens(cfg: DemoConfig) -> dict[str, Any]:
    dcfg = dvae_config(cfg)
    shards = sorted(str(p) for split in ("train", "val") for p in (data_dir(cfg) / split).glob("*.tar"))
    out = claim(cfg.tokens_output)  # overwritten: it must be ours
    s = encode_token_shards(Path(dcfg.run.run_dir) / "dvae", shards, out, overwrite=True)
    return {k: s[k] for k in ("written", "skipped", "grid", "vocab_size")} | {"output": cfg.tokens_output}


def _seconds(value: Any) -> bool:
    """Whether a timing read back from plan.json is a usable number of seconds."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf")


def stage_plan(cfg: DemoConfig) -> dict[str, Any]:
    """Time a few updates of each training stage and fit the three into ``train_minutes`` (demo_plan)."""
    from dalle_repro.demo import plan as dp

    dcfg, pcfg, ccfg = dvae_config(cfg, plan=False), prior_config(cfg, plan=False), clip_config(cfg, plan=False)
    updates = {"dvae": dcfg.run.steps, "prior": pcfg.run.steps, "clip": ccfg.run.steps}
    result: dict[str, Any] = {"train_minutes": cfg.train_minutes, "configured_updates": updates}
    fraction = 1.0
    if torch.cuda.is_available():  # the timers run the CPU paths; a GPU trains the configured runs
        result["note"] = "CUDA: the plan times CPU steps only; the configured runs are trained"
    elif cfg.train_minutes is not None:
        dv = dcfg.model
        tok = TextTokenizer(cfg.text.path, cfg.text.text_len)
        model = dataclasses.replace(
            pcfg.model,
            text_len=cfg.text.text_len,
            text_vocab=tok.vocab_size,
            grid=dv.grid,
            image_vocab=dv.vocab_size,
        )
        timers = {
            "dvae": (lambda: dp.dvae_step_seconds(dcfg), [to_dict(dv), dcfg.data.batch_size, dcfg.precision.dtype]),
            "prior": (
                lambda: dp.prior_step_seconds(model, pcfg.precision.dtype, pcfg.data.batch_size, cfg.prior_ranks),
                [to_dict(model), pcfg.data.batch_size, pcfg.precision.dtype, cfg.prior_ranks],
            ),
            "clip": (
                lambda: dp.clip_step_seconds(ccfg, cfg.text.path),
                [to_dict(ccfg.model), ccfg.data.batch_size, ccfg.precision.dtype],
            ),
        }
        # A plan made before keeps its timings where what they measured is unchanged, so that a rerun
        # (another setting changed) reaches the same fraction, not a new one from timing noise.
        old = read_plan(plan_path(cfg)) or {}
        keys = {k: _fingerprint(what, usable_cores(), torch.get_num_threads()) for k, (_, what) in timers.items()}
        seconds = {
            k: old_seconds if old.get("timing_keys", {}).get(k) == keys[k] and _seconds(old_seconds) else timer()
            for k, (timer, _) in timers.items()
            for old_seconds in [old.get("seconds_per_update", {}).get(k)]
        }
        dtypes = {k: dp.picked_dtype(c.precision.dtype) for k, c in (("dvae", dcfg), ("prior", pcfg), ("clip", ccfg))}
        factors = dp.stage_factors(dtypes)
        minutes = {k: seconds[k] * factors[k] * updates[k] / 60 for k in updates}
        fraction = round(dp.fraction_to_fit(minutes, cfg.train_minutes), 4)  # what planned() reads back
        result |= {
            "seconds_per_update": seconds,
            "timing_keys": keys,
            "factors": factors,
            "dtypes": dtypes,
            "predicted_minutes_configured": {k: round(v, 2) for k, v in minutes.items()},
            "predicted_minutes": round(sum(minutes.values()) * fraction, 2),
        }
    configs = {"dvae": dcfg, "prior": pcfg, "clip": ccfg}
    overrides = {k: dp.scaled_overrides(configs[k], dp.SCALED_KEYS[k], fraction) for k in configs}
    planned_updates = {k: dp.scaled(n, fraction) for k, n in updates.items()}
    result |= {"fraction": fraction, "planned_updates": planned_updates, "overrides": overrides}
    if fraction < 1:
        log.warning(
            "this machine would need %.1f minutes for the configured training (train_minutes=%s): the demo trains "
            "%.0f%% of it (%s)",
            sum(result["predicted_minutes_configured"].values()),
            cfg.train_minutes,
            100 * fraction,
            plan_path(cfg),
        )
    atomic_write_text(plan_path(cfg), json.dumps(result, indent=2))
    return result


def stage_prior(cfg: DemoConfig) -> dict[str, Any]:
    """Train the prior under the deepspeed launcher (``prior_ranks`` ranks), resuming a run of the same settings."""
    pcfg = prior_config(cfg)
    run_dir = claim(pcfg.run.run_dir)
    resume = _continues(run_dir, resolve_sizes(pcfg)[0])  # the run saves its sizes
    path = save_config(pcfg, cfg.out_dir, "prior_config.yaml")
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        launcher = Path(shutil.which("deepspeed") or "deepspeed")
    cmd = [str(launcher), "--num_gpus", str(cfg.prior_ranks), "--master_port", str(free_port())]
    # as a module, so that an installed (not editable) package runs the demo too
    # the file is ours, written just now from a config whose files were checked for pipe: shards
    cmd += ["--module", "dalle_repro.cli.train_prior", "--config", str(path), PIPE_FLAG]
    cmd += ["--resume"] if resume else []
    end_by = stage_end_by(cfg, "prior")  # on the command line: the saved prior_config.yaml stays reusable
    cmd += [f"run.end_by={end_by}"] if end_by is not None else []
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Each rank sets its own threads (distributed.set_cpu_threads: usable cores / LOCAL_SIZE)
        env |= {"DS_ACCELERATOR": "cpu"}
    log_path = Path(cfg.out_dir, "prior_train.log")
    with open(log_path, "w") as logf:
        code, stopped = _launch(cmd, logf, env)
    if stopped:
        raise _stopped("prior", run_dir)
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"prior training failed (exit {code}); its log is {log_path}:\n{tail}")
    final = load_yaml(run_dir / "final_metrics.json") if (run_dir / "final_metrics.json").is_file() else {}
    return final | {
        "model": str(run_dir / "export"),
        "samples": str(run_dir / "samples_latest.png"),
        "log": str(log_path),
        "run_dir": str(run_dir),
    }


def _launch(cmd: list[str], logf: Any, env: dict[str, str]) -> tuple[int, bool]:
    """Run the prior's launcher in its own process group; on the demo's SIGTERM/SIGINT, send SIGTERM
    to the whole group (the launcher, its ranks), whose ranks end their update and write a
    checkpoint. Returns (exit status, whether it was stopped)."""
    stop = STOP.get()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    sent = False
    try:
        while proc.poll() is None:
            if stop is not None and stop.signal is not None and not sent:
                log.warning("%s: stopping the prior's ranks (they write a checkpoint first)", stop.signal)
                os.killpg(proc.pid, signal.SIGTERM)
                sent = True
            time.sleep(0.2)
    except BaseException:
        if proc.poll() is None:  # never leave a training group behind
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        raise
    return proc.returncode, sent


def stage_clip(cfg: DemoConfig) -> dict[str, Any]:
    """Train the small CLIP, resuming a run of the same settings."""
    c = clip_config(cfg)
    c.run.end_by = stage_end_by(cfg, "clip")
    run_dir = Path(c.run.run_dir)
    resume = _continues(run_dir, c, own=False)  # inside out_dir, which is claimed
    result = train_clip(c, resume_run=resume, stop=STOP.get())
    _raise_if_stopped("clip", run_dir, result)
    return result | length_plan(run_dir) | {"model": str(clip_folder(c)), "run_dir": str(run_dir)}


def clip_model(cfg: DemoConfig) -> Path:
    """The demo's trained CLIP folder (RUN/clip of its CLIP run)."""
    return clip_folder(clip_config(cfg, plan=False))


def demo_captions(cfg: DemoConfig) -> list[tuple[str, str]]:
    """(caption, split) pairs: the chosen training captions, the first validation ones, new ones."""
    val: list[str] = []
    if cfg.captions_val:
        for _, members in iter_shard_samples(sorted(str(p) for p in (data_dir(cfg) / "val").glob("*.tar"))):
            val.append(clean_caption(members.get("txt", b"")))
            if len(val) >= cfg.captions_val:
                break
    return (
        [(c, "train") for c in cfg.captions_train]
        + [(c, "validation") for c in val]
        + [(c, "new") for c in cfg.captions_new]
    )


def stage_samples(cfg: DemoConfig) -> dict[str, Any]:
    """Sample every demo caption from the exported prior, rerank with the small CLIP, write grids."""
    prior = load_prior(Path(prior_config(cfg).run.run_dir, "export"))
    pick = prior.use_trained_precision()
    log.info("sampling precision: %s", pick.reason)
    reranker = Reranker(clip_model(cfg))
    pairs = demo_captions(cfg)
    settings = with_reference(cfg, cfg.sample)
    assert prior.dvae is not None
    results = generate(prior.model, prior.dvae, [c for c, _ in pairs], prior.tokenizer, settings, reranker)
    out = Path(cfg.out_dir, "samples")
    prompts, kept, everything = [], [], []
    for (caption, split), r in zip(pairs, results, strict=True):
        path = save_png(
            grid(
                list(r.images), ncol=len(r.images), labels=[f"{s:.3f}" for s in r.scores or []], scale=4, title=caption
            ),
            out / f"{len(prompts):02d}-{split}.png",
        )
        prompts.append({"caption": caption, "split": split, "grid": str(path)} | r.summary())
        kept += r.scores or []
        everything += r.candidate_scores or []
    mean_kept, mean_all = sum(kept) / len(kept), sum(everything) / len(everything)
    atomic_write_text(out / "samples.json", json.dumps(prompts, indent=2))
    return {
        "prompts": prompts,
        "mean_score_kept": mean_kept,
        "mean_score_all": mean_all,
        "rerank_gain": mean_kept - mean_all,
        "settings": dataclasses.asdict(settings),
        "precision": pick.reason,
    }


def stage_evaluate(cfg: DemoConfig) -> dict[str, Any]:
    """The zero-shot numbers (evaluate.zero_shot): seen and held-out captions sampled, read back,
    with and without rerank; tools/evaluate.py with the same settings gives the same numbers."""
    if cfg.dataset not in SCENES:
        return {"skipped": "the emoji have no attribute reader; the shapes and strokes data sets do"}
    prior = load_prior(Path(prior_config(cfg).run.run_dir, "export"))
    prior.use_trained_precision()
    e, d = cfg.evaluation, data_dir(cfg)
    result = zero_shot(
        prior,
        Reranker(clip_model(cfg)),
        f"{d}/val/*.tar",
        f"{d}/heldout/*.tar",
        with_reference(cfg, e.sample),
        captions=e.captions,
        train_shards=f"{d}/train/*.tar",
        pictures=e.pictures,
        out_dir=Path(cfg.out_dir, "evaluation"),
        inception=e.inception,
        world=cfg.dataset,
    )
    return result | {"command": evaluate_command(cfg)}


def with_reference(cfg: DemoConfig, s: SampleSettings) -> SampleSettings:
    """``s`` with the training shards as its rerank reference where the demo asks for it
    (``rerank_against_train``) and ``s`` names none of its own."""
    if cfg.rerank_against_train and s.rerank_reference is None:
        return dataclasses.replace(s, rerank_reference=f"{data_dir(cfg)}/train/*.tar")
    return s


def evaluate_command(cfg: DemoConfig) -> str:
    """tools/evaluate.py with the demo's settings: it reproduces the report's numbers."""
    e, d = cfg.evaluation, data_dir(cfg)
    s = with_reference(cfg, e.sample)
    top_k = f" --top-k {s.top_k}" if s.top_k else ""
    return (
        f"python tools/evaluate.py --model {prior_config(cfg).run.run_dir}/export --clip {clip_model(cfg)} "
        f"--seen '{d}/val/*.tar' --heldout '{d}/heldout/*.tar' --train '{d}/train/*.tar' "
        f"--captions {e.captions} --candidates {s.candidates} --temperature {s.temperature}{top_k} "
        f"--guidance {s.guidance} --seed {s.seed} "
        + (f"--rerank-reference '{s.rerank_reference}' " if s.rerank_reference else "")
        + (f"--inception {e.inception} " if e.inception else "")
        + (f"--world {cfg.dataset} " if cfg.dataset != "shapes" else "")
        + f"--pictures {e.pictures} --output {cfg.out_dir}/evaluation"
    )


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DemoConfig], dict[str, Any]]
    settings: Callable[[DemoConfig], Any]  # what defines the stage's output
    outputs: Callable[[DemoConfig], list[Path]]  # must all exist for the stage to count as done
    after: tuple[str, ...] = ()  # stages whose output it reads: a change there reruns it


def stages() -> list[Stage]:
    """The demo's stages, in order."""
    return [
        Stage(
            "data",
            stage_data,
            lambda c: [c.dataset, to_dict(data_args(c))],
            lambda c: (
                [data_dir(c) / "summary.json"]
                + ([data_dir(c) / dvae_images(c) / "summary.json"] if dvae_images(c) == UNLABELLED else [])
            ),
        ),
        Stage(
            "tokenizer",
            stage_tokenizer,
            lambda c: [to_dict(c.bpe), c.text.path],
            lambda c: [Path(c.text.path)],
            after=("data",),
        ),
        Stage(
            "preview",
            stage_preview,
            lambda c: [to_dict(c.data), to_dict(c.text)],
            lambda c: [Path(c.out_dir, "data_preview.png")],
            after=("data", "tokenizer"),
        ),
        Stage(
            "plan",
            stage_plan,
            lambda c: [
                c.train_minutes,
                to_dict(dvae_config(c, plan=False)),
                to_dict(prior_config(c, plan=False)),
                to_dict(clip_config(c, plan=False)),
                c.prior_ranks,
            ],
            lambda c: [plan_path(c)],
            after=("tokenizer",),
        ),
        Stage(
            "dvae",
            stage_dvae,
            lambda c: to_dict(dvae_config(c)),
            lambda c: [Path(dvae_config(c).run.run_dir, "dvae", "model.safetensors")],
            after=("data",),
        ),
        Stage(
            "tokens",
            stage_tokens,
            lambda c: c.tokens_output,
            lambda c: [Path(c.tokens_output, "summary.json")],
            after=("data", "dvae"),
        ),
        Stage(
            "prior",
            stage_prior,
            lambda c: [to_dict(prior_config(c)), c.prior_ranks],
            lambda c: [Path(prior_config(c).run.run_dir, "export", "model.safetensors")],
            after=("tokenizer", "dvae", "tokens"),
        ),
        Stage(
            "clip",
            stage_clip,
            lambda c: to_dict(clip_config(c)),
            lambda c: [clip_model(c) / "model.safetensors"],
            after=("data", "tokenizer"),
        ),
        Stage(
            "samples",
            stage_samples,
            lambda c: [c.captions_train, c.captions_val, c.captions_new, to_dict(with_reference(c, c.sample))],
            lambda c: [Path(c.out_dir, "samples", "samples.json")],
            after=("prior", "clip"),
        ),
        Stage(
            "evaluate",
            stage_evaluate,
            lambda c: [c.dataset, to_dict(c.evaluation), to_dict(with_reference(c, c.evaluation.sample))],
            lambda c: [Path(c.out_dir, "evaluation", "evaluation.json")] if c.dataset in SCENES else [],
            after=("data", "prior", "clip"),
        ),
    ]


def stage_fingerprint(stage: Stage, cfg: DemoConfig, done: dict[str, str]) -> str:
    """What marks a stage's output as current: its settings and the fingerprints (``done``) of the
    stages whose output it reads. Computed just before the stage runs: a later stage's settings may
    read what an earlier one wrote (the plan)."""
    return _fingerprint(inputs_of(stage, done), stage.settings(cfg))


def inputs_of(stage: Stage, done: dict[str, str]) -> list[str]:
    """The fingerprints (``done``) of the stages whose output ``stage`` reads (its ``after``)."""
    return [done[a] for a in stage.after]


@denormals_flushed()
def run_demo(
    cfg: DemoConfig, log: Callable[[str], None] = print, allow_pipe: bool = False, stop: StopRequested | None = None
) -> dict[str, dict[str, Any]]:
    """Run every unfinished stage; returns each stage's result (from its marker when skipped).
    ``allow_pipe``: the command line's --allow-pipe, which lets the dVAE and prior YAML files hold
    pipe: shards. ``stop``: the command's SIGTERM/SIGINT, installed by the caller: a training stage
    then ends its update, writes a checkpoint and :class:`DemoStopped` is raised; another stage
    finishes first (the next one does not start)."""
    token, stop_token = ALLOW_PIPE.set(allow_pipe), STOP.set(stop)
    try:
        return _run_stages(cfg, log)
    finally:
        ALLOW_PIPE.reset(token)
        STOP.reset(stop_token)


def _run_stages(cfg: DemoConfig, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    dvae_config(cfg, plan=False), prior_config(cfg, plan=False)  # a config file's error stops it before any stage
    out = claim(cfg.out_dir)
    save_config(cfg, out)
    results: dict[str, dict[str, Any]] = {}
    fps: dict[str, str] = {}
    settings: dict[str, Any] = {}
    for stage in stages():
        name = stage.name
        marker = out / "stages" / f"{name}.json"
        fp = fps[name] = stage_fingerprint(stage, cfg, fps)
        done = json.loads(marker.read_text()) if marker.is_file() else None
        complete = all(p.exists() for p in stage.outputs(cfg))
        if done is not None and done.get("fingerprint") == fp and complete:
            log(f"[{name}] done before, skipped ({marker})")
            results[name] = done["result"]
        else:
            stop = STOP.get()
            if stop is not None and stop.signal is not None:
                raise DemoStopped(
                    f"stopped ({stop.signal}) before the {name} stage; run the same command again to continue"
                )
            log(f"[{name}] running")
            t0 = time.perf_counter()
            token = INPUTS.set(_fingerprint(inputs_of(stage, fps)))
            try:
                results[name] = stage.run(cfg)
            finally:
                INPUTS.reset(token)
            seconds = round(time.perf_counter() - t0, 1)
            atomic_write_text(marker, json.dumps({"fingerprint": fp, "seconds": seconds, "result": results[name]}))
            log(f"[{name}] finished in {seconds} s")
            done = {"seconds": seconds}
        settings[name] = {"seconds": done.get("seconds"), "settings": stage.settings(cfg)}
    report = write_report(out, results, settings)
    log(f"[report] {report} and {report.with_suffix('.html')}")
    return results
