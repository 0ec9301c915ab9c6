"""Prior training under DeepSpeed: exact resume at every ZeRO stage, the export, caption dropout,
non-finite steps, the schedule, the generated DeepSpeed config, config errors, and multi-process
runs under the deepspeed launcher (2 ranks, two --no_ssh "nodes", SIGTERM)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import LAUNCH_ENV, checkpoint_state, launch_env, launcher, prior_overrides, train_prior_on_two_ranks
from safetensors.torch import load_file

from dalle_repro.core.config import ConfigError, load_config, save_config
from dalle_repro.core.distributed import free_port
from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.train.deepspeed import deepspeed_config
from dalle_repro.train.metrics import read_metrics
from dalle_repro.train.prior import (
    Counters,
    LRSchedule,
    NonFiniteLosses,
    batch_tokens,
    train,
)
from dalle_repro.train.prior_config import PriorScheduleArgs, PriorTrainConfig, resolve_sizes

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]


def config(data: dict[str, Path], run_dir: Path, *extra: str) -> PriorTrainConfig:
    return load_config(PriorTrainConfig, None, prior_overrides(data, run_dir, *extra))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_a_run_after_a_closed_one_in_the_same_process(prior_data, tmp_path):
    """run_trainer destroys the process group at the end of a run; a later run in the same process
    (a test, a notebook) joins a new one, and DeepSpeed must not keep the destroyed one's groups."""
    import torch.distributed as dist

    from dalle_repro.cli.errors import run_trainer

    first = config(prior_data, tmp_path / "a", "run.steps=1")
    assert run_trainer(lambda stop: train(first, stop=stop))[0] == 0 and not dist.is_initialized()
    assert train(config(prior_data, tmp_path / "b", "run.steps=1"))["ended"] == "done"


@pytest.mark.parametrize("zero", [0, 2])
def test_stop_and_resume_equals_an_uninterrupted_run(prior_data, tmp_path, zero):
    """3 steps + stop + resume for 3 more = 6 steps: the same losses and bit-identical weights."""
    whole = train(config(prior_data, tmp_path / "whole", f"deepspeed.zero_stage={zero}"))
    assert whole["step"] == 6 and whole["ended"] == "done"
    part = train(config(prior_data, tmp_path / "split", f"deepspeed.zero_stage={zero}", "run.stop_after=3"))
    assert part["step"] == 3 and part["ended"] == "stop_after"
    assert not (tmp_path / "split" / "export").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(prior_data, tmp_path / "split", f"deepspeed.zero_stage={zero}"))
    train(config(prior_data, tmp_path / "split", f"deepspeed.zero_stage={zero}"), resume_run=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 6
    for name in ("model", "raw"):
        a = load_file(str(tmp_path / "whole" / "export" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "split" / "export" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = read_metrics(tmp_path / "whole")
    assert sum(r["caption_dropped"] for r in rows if r["step"] == 6 and "caption_dropped" in r) > 0
    assert {"val_loss", "val_text_loss", "val_image_loss"} <= set(rows[-1])


def test_stop_and_resume_at_zero_stage_3(prior_data, tmp_path):
    """ZeRO-3 (partitioned weights) resumes exactly too; separate processes, as in real use (ZeRO-3's
    parameter tracing does not survive several engines in one process)."""
    script = str(ROOT / "launch" / "train_prior.py")
    runs = {}
    for name, extra in (("whole", []), ("split", ["run.stop_after=3"]), ("split", ["--resume"])):
        cfg = _write_config(prior_data, tmp_path, tmp_path / name, "deepspeed.zero_stage=3", "run.ckpt_every=100")
        r = subprocess.run(
            [sys.executable, script, "--config", str(cfg), *extra],
            capture_output=True,
            text=True,
            env=launch_env(),
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tmp_path / name
    assert losses(runs["split"]) == losses(runs["whole"]) and len(losses(runs["whole"])) == 6
    a = load_file(str(runs["whole"] / "export" / "raw.safetensors"))
    b = load_file(str(runs["split"] / "export" / "raw.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # DeepSpeed compiles its CPU Adam op on first use: ~50 s of the default suite's 10 minutes
def test_deepspeed_optimizer_from_the_generated_config(prior_data, tmp_path, caplog):
    """optim.impl=deepspeed: DeepSpeed builds the optimizer from the config's section, and it trains."""
    import logging

    with caplog.at_level(logging.INFO, logger="dalle_repro.train.prior"):
        train(config(prior_data, tmp_path / "ds", "optim.impl=deepspeed", "run.steps=4", "run.caption_dropout=0"))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("optimizer:"))
    assert "optim.impl=deepspeed" in line and "AdamW (optim.impl=torch" not in line
    seen = losses(tmp_path / "ds")
    assert len(seen) == 4 and seen[-1][1] < seen[0][1]


def test_image_shards_are_encoded_on_the_fly(prior_data, emoji_dir, tmp_path):
    """data.kind=images: the dVAE encodes each batch; the same tokens as the pre-encoded shards."""
    extra = ["data.kind=images", f"data.shards={emoji_dir}/train/*.tar", "run.steps=2"]  # image size: the dVAE's
    out = train(config(prior_data, tmp_path / "img", *extra, f"run.val_shards={emoji_dir}/val/*.tar"))
    assert out["step"] == 2 and math.isfinite(out["val_loss"])
    with pytest.raises(ConfigError, match="data.image_size"):
        train(config(prior_data, tmp_path / "bad", *extra, "data.image_size=32"))


def test_export_loads_and_samples_without_deepspeed(prior_data, tmp_path):
    run = tmp_path / "run"
    train(config(prior_data, run, "run.steps=2", "run.sample_every=2", "precision.dtype=auto"))
    # the run's config keeps auto and notes the pick; the export keeps auto for the sampler to pick
    from dalle_repro.core.precision import auto_precision

    picked = auto_precision("cpu")
    assert (run / "config.yaml").read_text().startswith(f"# precision: precision.dtype=auto picked {picked.reason}")
    assert load_config(PriorTrainConfig, run / "config.yaml").precision.dtype == "auto"
    assert load_config(PriorTrainConfig, run / "export" / "config.yaml").precision.dtype == "auto"
    export = run / "export"
    assert {p.name for p in export.iterdir()} >= {
        "model.safetensors",
        "raw.safetensors",
        "config.yaml",
        "tokenizer.json",
        "dvae",
        "export.json",
    }
    assert (run / "samples_latest.png").is_file() and (run / "deepspeed.json").is_file()
    code = f"""
import sys
sys.modules["deepspeed"] = None  # importing it now fails: the export must not need it
import torch
from dalle_repro.sample.export import load_prior
p = load_prior({str(export)!r})
text = torch.tensor([p.tokenizer.encode("a red heart")])
tokens = p.model.generate(text, temperature=1.0, generator=torch.Generator().manual_seed(0))
images = p.dvae.decode(tokens.view(1, 4, 4))
assert images.shape == (1, 3, 16, 16), images.shape
print(p.info["step"], p.info["caption_dropout"], p.use_trained_precision().dtype)
"""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["2", "0.3", picked.dtype]
    ema = load_file(str(export / "model.safetensors"))
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert all(torch.equal(ema[k], v) for k, v in load_file(str(last / "ema.safetensors")).items())


def test_caption_dropout_replaces_captions_with_the_empty_one(prior_data):
    tok = TextTokenizer(prior_data["tokenizer"], 8)
    empty = torch.tensor(tok.encode(""))
    cfg = SimpleNamespace(model=SimpleNamespace(grid=4), run=SimpleNamespace(caption_dropout=0.5), data=None)
    r = SimpleNamespace(cfg=cfg, d=SimpleNamespace(device=torch.device("cpu")), empty_text=empty, counters=Counters())
    text = torch.tensor([tok.encode("grinning face")] * 400)
    batch = {"text": text, "image_tokens": torch.zeros(400, 4, 4, dtype=torch.long)}
    torch.manual_seed(0)
    out, image = batch_tokens(r, batch, train=True)  # type: ignore[arg-type]
    dropped = (out == empty).all(1)
    assert torch.equal(out[~dropped], text[~dropped])  # the others are untouched
    assert 150 < int(dropped.sum()) < 250 and r.counters.caption_dropped == int(dropped.sum())
    assert image.shape == (400, 16)
    same, _ = batch_tokens(r, batch, train=False)  # never at validation
    assert torch.equal(same, text)


def test_nonfinite_losses_are_skipped_then_stop_the_run(prior_data, tmp_path, monkeypatch):
    from dalle_repro.models.transformer import Transformer

    real = Transformer.loss_from_logits
    calls = {"n": 0}

    def poisoned(self, text, image, tl, il):
        calls["n"] += 1
        out = real(self, text, image, tl, il)
        if calls["n"] in (2, 3) or calls["n"] >= 5:  # steps 2, 3 and from 5 on
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "loss_from_logits", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLosses, match="3 non-finite losses in a row at step 7"):
        train(config(prior_data, run, "run.steps=20", "run.max_nonfinite=3", "run.val_shards=null"))
    rows = [r for r in read_metrics(run) if "skipped_step" in r]
    assert [r["skipped_step"] for r in rows] == [0, 1, 1, 0, 1, 1, 1]
    assert rows[-1]["skipped_steps"] == 5
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert last.name == "step_00000007"
    ema = load_file(str(last / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values())  # no checkpoint holds a NaN


def test_skipped_step_moves_no_weight(prior_data, tmp_path, monkeypatch):
    """At ZeRO 0 a skipped step leaves every weight and Adam's state as it was."""
    from dalle_repro.models.transformer import Transformer
    from dalle_repro.train import prior as tp

    real = Transformer.loss_from_logits

    def poisoned(self, *args):
        out = real(self, *args)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "loss_from_logits", poisoned)
    snapshots = []
    real_step = tp.train_step

    def watched(r, it):
        before = {k: v.clone() for k, v in r.model.state_dict().items()}
        out = real_step(r, it)
        snapshots.append(all(torch.equal(before[k], v) for k, v in r.model.state_dict().items()))
        return out

    monkeypatch.setattr(tp, "train_step", watched)
    with pytest.raises(NonFiniteLosses):
        train(config(prior_data, tmp_path / "run", "run.max_nonfinite=2", "run.val_shards=null"))
    assert snapshots == [True, True]


def test_a_deadline_shortens_the_run_and_ends_its_cosine_with_it(prior_data, tmp_path, monkeypatch):
    """run.end_by, nearly reached at the first check (update 7 of 30): the run ends at update 8 with
    its learning rate at the cosine's end, and says so in final_metrics.json."""
    from dalle_repro.train import loop

    end = 2.0e9
    clock = iter([end - 100.0])  # the start is in time; from then on the deadline is a millisecond away
    monkeypatch.setattr(loop, "_clock", lambda: next(clock, end - 0.001))
    cfg = config(prior_data, tmp_path / "run", "run.steps=30", "schedule.warmup_steps=4", f"run.end_by={end}")
    out = train(cfg)
    assert out["step"] == 8 and out["ended"] == "done" and (tmp_path / "run" / "export" / "model.safetensors").is_file()
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["planned_steps"] == 8 and final["configured_steps"] == 30 and final["length_changes"][0]["step"] == 7
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    # the last update's rate: the cosine's 6/7 point (0.05 of the peak) where 30 updates would still be near the peak
    assert lrs[-1] < 0.1 * cfg.schedule.lr and max(lrs) == pytest.approx(cfg.schedule.lr)


def test_learning_rate_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedule(opt, PriorScheduleArgs(lr=1e-3, warmup_steps=4, decay="cosine", lr_end=1e-5), total_steps=14)
    seen = [s.get_last_lr()[0]]
    for _ in range(14):
        s.step()
        seen.append(s.get_last_lr()[0])
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up
    assert seen[4] == pytest.approx(1e-3) and seen[14] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(seen[4:], seen[5:], strict=False))
    p = LRSchedule(opt, PriorScheduleArgs(lr=1e-3, warmup_steps=0, decay="plateau", plateau_patience=2), 100)
    for loss in (3.0, 2.0, 2.5, 2.4):  # two validations without a new best: halve
        p.report(loss)
    assert p.get_last_lr()[0] == pytest.approx(5e-4)
    q = LRSchedule(opt, PriorScheduleArgs(lr=1e-3, warmup_steps=0, decay="plateau"), 100)
    q.load_state_dict(p.state_dict())
    assert q.get_last_lr()[0] == pytest.approx(5e-4)


def test_generated_deepspeed_config_and_user_override(prior_data, tmp_path):
    cfg = config(prior_data, tmp_path, "deepspeed.zero_stage=2", "deepspeed.grad_accum=3", "optim.impl=deepspeed")
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 4 * 3 * 4 and ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 4.0 and ds["optimizer"]["params"]["betas"] == [0.9, 0.96]
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # block_scaled mode: fp32 weights
    mine = tmp_path / "mine.json"
    mine.write_text(
        json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_accumulation_steps": 1})
    )
    ds = deepspeed_config(config(prior_data, tmp_path, f"deepspeed.config={mine}"), world_size=2)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True} and ds["train_batch_size"] == 8
    mine.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7}))
    with pytest.raises(ConfigError, match="data.batch_size=7"):
        deepspeed_config(config(prior_data, tmp_path, f"deepspeed.config={mine}"), world_size=1)
    ds = deepspeed_config(config(prior_data, tmp_path, "precision.mode=deepspeed"), world_size=1)
    assert ds["bf16"]["enabled"]


@pytest.mark.parametrize("key", [{"checkpoint": {"load_universal": True}}, {"datastates_ckpt": {"enabled": True}}])
def test_a_users_deepspeed_json_cannot_switch_on_an_unpickling_read_path(prior_data, tmp_path, key):
    """Issue 18 item 2: checkpoint.load_universal reaches torch.load(weights_only=False) past any engine."""
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(key))
    with pytest.raises(ConfigError, match=f"sets {next(iter(key))}.*never unpickles"):
        deepspeed_config(config(prior_data, tmp_path, f"deepspeed.config={mine}"), world_size=1)


def test_resume_refuses_an_engine_that_would_unpickle():
    from types import SimpleNamespace

    from dalle_repro.train.deepspeed import check_safe_loading, safe_checkpoint_engine

    check_safe_loading(
        SimpleNamespace(checkpoint_engine=safe_checkpoint_engine(), load_universal_checkpoint=lambda: False)
    )
    with pytest.raises(RuntimeError, match="universal"):
        check_safe_loading(
            SimpleNamespace(checkpoint_engine=safe_checkpoint_engine(), load_universal_checkpoint=lambda: True)
        )
    with pytest.raises(RuntimeError, match="not ours"):
        check_safe_loading(SimpleNamespace(checkpoint_engine=object(), load_universal_checkpoint=lambda: False))


def test_sizes_are_read_off_the_tokenizer_the_dvae_and_the_token_summary(prior_data, tmp_path):
    """Issue 18 item 14: no size is typed by hand; each comes from its source, a typed one is checked."""
    vocab = TextTokenizer(prior_data["tokenizer"], 8).vocab_size
    cfg, notes = resolve_sizes(config(prior_data, tmp_path))
    m = cfg.model
    assert (m.text_len, m.text_vocab, m.grid, m.image_vocab) == (8, vocab, 4, 32)
    assert any(n.startswith(f"model.text_vocab: {vocab} (from ") for n in notes)
    assert any(n.startswith("model.grid: 4 (from the dVAE") for n in notes)
    # without a dVAE, the token shards' summary.json (encode_tokens writes it at the top of its output)
    cfg, notes = resolve_sizes(config(prior_data, tmp_path, "dvae=null"))
    assert (cfg.model.grid, cfg.model.image_vocab) == (4, 32)
    assert any("summary.json" in n for n in notes if n.startswith("model.image_vocab"))
    # a typed size that agrees is kept; one that does not names both numbers and its source
    assert resolve_sizes(config(prior_data, tmp_path, "model.image_vocab=32"))[0].model.image_vocab == 32
    with pytest.raises(ConfigError, match=r"model.image_vocab: 64, but the dVAE .* gives 32; leave it unset"):
        resolve_sizes(config(prior_data, tmp_path, "model.image_vocab=64"))
    with pytest.raises(ConfigError, match=rf"model.text_vocab: 9999, but .*tokenizer.json .* gives {vocab}"):
        resolve_sizes(config(prior_data, tmp_path, "model.text_vocab=9999"))
    # token shards without their summary and no dVAE: say what to do
    bare = tmp_path / "bare"
    shutil.copytree(prior_data["tokens"] / "train", bare / "train")
    with pytest.raises(ConfigError, match=r"model.grid: not set, and there is no dvae= and no summary.json"):
        resolve_sizes(config(prior_data, tmp_path, "dvae=null", f"data.shards={bare}/train/*.tar"))
    assert (
        resolve_sizes(
            config(
                prior_data,
                tmp_path,
                "dvae=null",
                f"data.shards={bare}/train/*.tar",
                "model.grid=4",
                "model.image_vocab=32",
            )
        )[0].model.grid
        == 4
    )
    # the run records the values and where each came from
    train(config(prior_data, tmp_path / "run", "run.steps=1"))
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert f"# model.text_vocab: {vocab} (from " in written and f"  text_vocab: {vocab}\n" in written


def test_config_errors_name_the_field(prior_data, tmp_path):
    with pytest.raises(ConfigError, match=r"model.text_len: 8, but text.text_len is 9; state it once"):
        config(prior_data, tmp_path, "text.text_len=9", "model.text_len=8")
    with pytest.raises(ConfigError, match="dvae: image shards"):
        config(prior_data, tmp_path, "data.kind=images", "dvae=null")
    with pytest.raises(ConfigError, match="model.text_vocab"):
        train(config(prior_data, tmp_path / "v", "model.text_vocab=9999"))
    with pytest.raises(ConfigError, match="precision.dtype: fp16 needs CUDA"):
        train(config(prior_data, tmp_path / "h", "precision.dtype=fp16", "run.device=cpu"))
    from dalle_repro.core import precision
    from dalle_repro.core.precision import Pick

    with mock.patch.object(precision, "_auto", lambda *_: Pick("fp32", "fp32: no native bf16 here")):
        with pytest.raises(ConfigError, match="'deepspeed' needs bf16 or fp16, and precision.dtype=auto picked fp32"):
            train(config(prior_data, tmp_path / "d", "precision.mode=deepspeed", "precision.dtype=auto"))
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train_prior.py"), "schedule.lr=-1"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "schedule.lr" in r.stderr


# ----------------------------------------------------------------------------------------------
# Several processes


def _write_config(prior_data, tmp_path: Path, run_dir: Path, *extra: str) -> Path:
    path = tmp_path / f"{run_dir.name}.yaml"
    save_config(config(prior_data, run_dir, "run.ckpt_every=2", *extra), tmp_path, path.name)
    return path


def test_two_ranks_under_the_deepspeed_launcher_agree(prior_data, tmp_path):
    """... on the weights, and on run.end_by's check (a collective at update 7: a far deadline, no change)."""
    run = tmp_path / "ddp"
    far = f"run.end_by={time.time() + 3600}"
    cfg = _write_config(prior_data, tmp_path, run, "run.steps=8", "deepspeed.zero_stage=1", far)
    train_prior_on_two_ranks(cfg)
    ranks = checkpoint_state(run, 8)["ranks"]
    assert len(ranks) == 2 and ranks[0]["weights"] == ranks[1]["weights"]
    assert json.loads((run / "final_metrics.json").read_text())["planned_steps"] == 8
    assert [x["loader"]["rank"] for x in ranks] == [0, 1]
    assert json.loads((run / "deepspeed.json").read_text())["train_batch_size"] == 8
    assert (run / "export" / "model.safetensors").is_file()


def test_two_nodes_started_separately_with_no_ssh(prior_data, tmp_path):
    """`deepspeed --no_ssh --node_rank K` once per "node" (both on localhost): they train one model."""
    run = tmp_path / "nodes"
    cfg = _write_config(prior_data, tmp_path, run, "run.steps=4")
    hosts = tmp_path / "hostfile"
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [launcher(), "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(k), "--master_addr", "127.0.0.1"]
            + ["--master_port", port, str(ROOT / "launch" / "train_prior.py"), "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=launch_env(),
            cwd=ROOT,
        )
        for k in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    ranks = checkpoint_state(run, 4)["ranks"]
    assert len(ranks) == 2 and ranks[0]["weights"] == ranks[1]["weights"]


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(prior_data, tmp_path):
    run = tmp_path / "term"
    cfg = _write_config(prior_data, tmp_path, run, "run.steps=100000", "run.ckpt_every=100000")
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "train_prior.py"), "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=launch_env(),
        cwd=ROOT,
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or len(read_metrics(run)) < 3:
        assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert '"ended": "signal"' in out
    steps = sorted(int(x.name[5:]) for x in (run / "checkpoints").glob("step_*"))
    assert len(steps) == 1 and steps[0] >= 3
    assert checkpoint_state(run, steps[0])["step"] == steps[0]


def test_errors_name_the_folder_kind_found_and_the_one_wanted(prior_data, tmp_path):
    """Issue 18 item 17: run folders, a model of the other kind and a shard folder, given where a
    model or shards are wanted, said "model.safetensors not found (the folder has [])", "unknown key
    image_size" or "none of the 1 shards exists"."""
    from dalle_repro.data.sources import expand_shards
    from dalle_repro.models.dvae import DVAE
    from dalle_repro.sample.export import load_prior

    run = tmp_path / "dvae_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(prior_data["dvae"], run / "dvae")
    with pytest.raises(FileNotFoundError, match=f"{run} is a dVAE training run; its model is in {run / 'dvae'}"):
        DVAE.from_pretrained(run)
    with pytest.raises(FileNotFoundError, match="is a dVAE model folder, not a prior export"):
        load_prior(prior_data["dvae"])
    with pytest.raises(FileNotFoundError, match="is a folder of shards, not a dVAE model folder"):
        DVAE.from_pretrained(prior_data["tokens"] / "train")
    with pytest.raises(ValueError, match=r"is a folder; give its shards, e.g. .*train/\*\.tar \(\d+ \.tar files"):
        expand_shards(str(prior_data["tokens"] / "train"))


def test_token_shards_of_another_grid_fail_before_training(prior_data, tmp_path):
    """Issue 18 item 17: shards from another dVAE ended in a 42-line traceback (wrong_token_grid)."""
    bare = tmp_path / "bare"  # no summary.json and no dVAE: the sizes are typed, and the shards disagree
    shutil.copytree(prior_data["tokens"] / "train", bare / "train")
    cfg = config(
        prior_data, tmp_path, "dvae=null", f"data.shards={bare}/train/*.tar", "model.grid=7", "model.image_vocab=32"
    )
    with pytest.raises(ConfigError, match=r"model.grid: 7, but the token shards hold 4x4 grids .*another dVAE"):
        train(cfg)


def test_a_stop_before_the_first_update_says_so_and_trains_nothing(prior_data, tmp_path, caplog):
    """Issue 18 item 15: a SIGTERM during the set-up (DeepSpeed's first compile) printed "stops after
    this update, with a checkpoint" before any update, then trained one."""
    import logging

    from dalle_repro.train.prior import StopRequested

    stop = StopRequested()
    with caplog.at_level(logging.WARNING, logger="dalle_repro.train.prior"):
        stop._handle(signal.SIGTERM, None)  # as if delivered while the run was being built
        result = train(config(prior_data, tmp_path / "early"), stop=stop)
    assert "before the first update" in caplog.text and "with a checkpoint" not in caplog.text
    assert result == {"step": 0, "ended": "signal_before_training"}
    assert not list((tmp_path / "early" / "checkpoints").glob("step_*"))


def _another_dvae(root: Path, seed: int, **changes: int) -> Path:
    """A random dVAE like the ``prior_data`` one, with other sizes or (another seed) other weights."""
    import dataclasses

    from dalle_repro.models.dvae import DVAE, DVAEArgs

    torch.manual_seed(seed)
    args = DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8)
    DVAE(dataclasses.replace(args, **changes)).save_pretrained(root / "other_dvae")
    return root / "other_dvae"


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"vocab_size": 64}, r"has 64 codes on a 4x4 grid, but the dVAE .* has 32 codes on a 4x4 grid"),
        ({"group_count": 2}, r"has 32 codes on a 8x8 grid, but the dVAE .* has 32 codes on a 4x4 grid"),
        ({}, r"weights digest \w+\) has the shape of the dVAE .* but not its weights"),
    ],
)
def test_token_shards_of_another_dvae_are_refused_at_start(prior_data, tmp_path, monkeypatch, changes, words):
    """dvae= a dVAE other than the one that encoded the shards trained on codes that mean other
    pictures, and exited 0; the shards' summary.json names the codebook, grid and weights."""
    from dalle_repro.train import prior as tp

    other = _another_dvae(tmp_path, seed=1, **changes)
    monkeypatch.setattr(tp, "Transformer", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=words) as e:
        train(config(prior_data, tmp_path / "run", f"dvae={other}"))
    assert str(other) in str(e.value) and str(prior_data["tokens"] / "summary.json") in str(e.value)


def test_too_few_shards_are_refused_before_the_model_is_built(prior_data, tmp_path, monkeypatch):
    """The shard count against ranks x workers was checked by the loader, after the model and
    DeepSpeed were built."""
    from dalle_repro.train import prior as tp

    monkeypatch.setattr(tp, "Transformer", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=r"data.shards: \d+ shards cannot feed 1 ranks x 64 workers.*--shard-size"):
        train(config(prior_data, tmp_path / "run", "data.num_workers=64"))


def test_truncated_captions_are_counted(prior_data, tmp_path):
    """Captions longer than text.text_len are cut by the tokenizer: counted, and their share reported."""
    tok = TextTokenizer(prior_data["tokenizer"], 8)
    captions = ["grinning face", "a face", "grinning face with big eyes and a smile and a hat on top", "red heart"]
    cfg = SimpleNamespace(model=SimpleNamespace(grid=4), run=SimpleNamespace(caption_dropout=0.0), data=None)
    r = SimpleNamespace(cfg=cfg, d=SimpleNamespace(device=torch.device("cpu")), tokenizer=tok, counters=Counters())
    batch = {
        "caption": captions,
        "text": torch.tensor([tok.encode(c) for c in captions]),
        "image_tokens": torch.zeros(4, 4, 4, dtype=torch.long),
    }
    batch_tokens(r, batch, train=True)  # type: ignore[arg-type]
    long = sum(len(tok.bpe_ids(c)) > 8 for c in captions)
    assert long >= 1 and r.counters.captions_truncated == long and r.counters.captions_seen == 4
    run = tmp_path / "run"
    train(config(prior_data, run, "run.steps=2", "run.caption_dropout=0"))
    rows = [row for row in read_metrics(run) if "loss" in row]
    assert all("captions_truncated" in row for row in rows) and rows[-1]["captions_seen"] == 8
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["captions_truncated"] == rows[-1]["captions_truncated"]
    assert final["captions_truncated_share"] == final["captions_truncated"] / 8
