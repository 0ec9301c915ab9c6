"""The benchmark's own diagnostics (bench/run.py): what they measure must be what they say."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import bench_script, dvae_overrides

from dalle_repro.models import dvae
from dalle_repro.models.dvae import DVAE, DVAEArgs, logit_laplace_nll, map_pixels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_run"]


def _tiny():
    torch.manual_seed(0)
    args = DVAEArgs(image_size=8, n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16, n_init=8)
    return DVAE(args), torch.rand(2, 3, 8, 8)


@pytest.mark.parametrize("name", ["fixed_scale", "mse"])
def test_ablation_likelihood_reaches_the_training_loss(bench, name):
    """The --ablation swap must change the loss DVAE.forward trains on, and nothing else."""
    model, x = _tiny()
    out = model.decoder(torch.softmax(model.encoder(map_pixels(x)), 1)).float()
    mu, ln_b = out[:, :3], out[:, 3:]
    fn = bench.ABLATION_LIKELIHOODS[name]
    torch.manual_seed(1)
    paper = model(x, tau=1.0, beta=0.0).nll.item()
    with mock.patch.object(dvae, "logit_laplace_nll", fn):
        torch.manual_seed(1)
        swapped = model(x, tau=1.0, beta=0.0)
    assert swapped.nll.item() != pytest.approx(paper, rel=1e-3)
    swapped.loss.backward()
    ln_b_grad = model.decoder.blocks.output.conv.b.grad[3:]
    assert torch.count_nonzero(ln_b_grad) == 0, "the swapped likelihoods must not train ln b"
    assert dvae.logit_laplace_nll is logit_laplace_nll  # the patch is undone
    # Each swap is the formula it names, on the same statistics.
    xm = map_pixels(x)
    if name == "fixed_scale":
        assert torch.allclose(fn(xm, mu, ln_b), logit_laplace_nll(xm, mu, torch.zeros_like(ln_b)))
    else:
        assert torch.allclose(fn(xm, mu, ln_b), (torch.sigmoid(mu) - xm) ** 2)


def test_every_result_carries_the_machine_record(bench, monkeypatch, capsys):
    from dalle_repro.core.cpuinfo import cpu_flags, read_cpuinfo, x86_level
    from dalle_repro.core.precision import auto_precision

    peaks = {"peak_fp32_gflops": 123.4, "peak_bf16_gflops": 234.5}
    monkeypatch.setattr(bench, "matmul_peak", lambda threads: peaks)  # a 2048^3 product takes seconds
    monkeypatch.setitem(bench.WORKLOADS, "tiny", lambda a: {"tiny_per_s": 1.0})
    threads = torch.get_num_threads()
    try:
        assert bench.main(["tiny", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    [line] = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert result["workload"] == "tiny" and result["tiny_per_s"] == 1.0
    m = result["machine"]
    assert m["cpu"] and m["torch"] == torch.__version__ and m["threads"] == 1
    flags = cpu_flags(read_cpuinfo())
    assert m["isa_level"] == (x86_level(flags) if m["arch"].lower() in ("x86_64", "amd64") else None)
    assert m["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    pick = auto_precision("cpu")
    assert m["bf16_native"] == (pick.dtype == "bf16") and m["auto_precision"] == pick.reason
    assert m["peak_gflops"] == {"fp32": 123.4, "bf16": 234.5}
    assert set(m["peak_size"]) == {"fp32", "bf16"} and m["probe_gflops"]["size"] == 256


def _fake_child(cmd, env=None):
    """What a measuring child process prints: bf16 twice as fast as fp32."""
    rate = 200.0 if "bf16" in cmd else 100.0
    return {"img_per_s": rate, "tok_per_s": rate, "gflops": rate, "weight_bytes": 10**6, "tokens": 256}


@pytest.mark.parametrize("picked", ["fp32", "bf16"])
@pytest.mark.parametrize("workload, unit", [("vae_train", "img"), ("prior_train", "tok"), ("sample", "img")])
def test_the_headline_is_at_the_precision_auto_picks(bench, monkeypatch, workload, unit, picked):
    from dalle_repro.core.precision import Pick

    monkeypatch.delenv("ANCHOR_VENV", raising=False)
    monkeypatch.setattr(bench, "_subprocess_json", _fake_child)
    monkeypatch.setattr(bench, "matmul_peak", lambda threads: {"peak_fp32_gflops": 1.0, "peak_bf16_gflops": 2.0})
    monkeypatch.setattr(bench, "memory_bandwidth", lambda threads: 1e10)
    seen = []

    def pick(requested, device, key):
        seen.append(requested)
        return Pick(picked, f"{picked}: the test's machine")

    monkeypatch.setattr(bench, "pick_precision", pick)
    monkeypatch.setattr(bench, "auto_precision", lambda device: Pick(picked, "auto on the test's machine"))
    out = bench.WORKLOADS[workload](SimpleNamespace(rounds=1, threads=1, precision="auto"))
    assert seen == ["auto"]
    assert out["precision"] == picked and out["precision_reason"] == f"{picked}: the test's machine"
    assert out[f"{workload}_{unit}_per_s"] == (200.0 if picked == "bf16" else 100.0)
    assert out[f"{workload}_fp32_{unit}_per_s"] == 100.0
    # bf16 is measured only where it runs natively: elsewhere one bf16 prior step takes minutes
    assert out.get(f"{workload}_bf16_{unit}_per_s") == (200.0 if picked == "bf16" else None)


def test_isa_avx2_is_recorded_only_when_every_variable_is_set(bench, monkeypatch):
    for k in bench.AVX2_ENV:
        monkeypatch.delenv(k, raising=False)
    assert bench._emulated_isa() is None
    for k, v in bench.AVX2_ENV.items():
        monkeypatch.setenv(k, v)
    assert bench._emulated_isa() == "avx2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert bench._emulated_isa() is None


def test_gpu_check_runs_every_check_in_a_dry_run_on_the_cpu(tmp_path):
    """bench/gpu_check.py --dry-run: every check builds and runs at toy sizes, the flex path agrees
    with dense, the forced overflow skips exactly its branch, and the report has every field."""
    import os
    import subprocess

    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    names = {"cuda_tests", "flex_vs_dense", "fp16_block_skip", "prior_350m", "prior_1.3b", "sampling", "dvae_fp16"}
    assert set(report["checks"]) == names and report["ok"] and report["dry_run"]
    assert report["checks"]["fp16_block_skip"]["skipped"] == [[], [1], []]
    assert (
        "cuda" in report["checks"]["cuda_tests"]["summary"] or "selected" in report["checks"]["cuda_tests"]["summary"]
    )
    for name in ("prior_350m", "prior_1.3b"):
        assert {"tokens_per_s", "model_tflops", "mfu"} <= set(report["checks"][name])


def test_gpu_check_refuses_to_run_without_cuda_unless_dry():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "--dry-run" in r.stderr


def test_denormals_bench_times_every_case_of_a_trained_dvae(emoji_dir, tmp_path):
    # bench/denormals.py at tiny size: a 6-update dVAE run, one round of its four cases
    from dalle_repro.core.config import load_config
    from dalle_repro.train.dvae import DVAETrainConfig, train

    train(load_config(DVAETrainConfig, None, dvae_overrides(emoji_dir, tmp_path / "run")))
    out = tmp_path / "denormals.json"
    cmd = [sys.executable, str(ROOT / "bench" / "denormals.py"), "--run", str(tmp_path / "run")]
    cmd += ["--rounds", "1", "--warm", "1", "--timed", "2", "--images", "2", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result == json.loads(done.stdout.strip().splitlines()[-1])
    assert result["step"] == 6 and result["image_size"] == 16 and result["batch"] == 8  # the latest checkpoint's
    ms = result["ms_per_update"]
    assert set(ms) == {"fresh_kept", "fresh_flushed", "trained_kept", "trained_flushed"} and min(ms.values()) > 0
    assert result["trained_kept_over_flushed"] == round(ms["trained_kept"] / ms["trained_flushed"], 3)
    assert len(result["trained_kept_over_flushed_per_round"]) == 1
    assert 0 <= result["grad_denormal_share"]["trained"] < 1 and result["machine"]["cpu"]
    denormals = bench_script("denormals")
    assert denormals.checkpoint_of(tmp_path / "run", 3).name == "step_00000003"
    bad = ((tmp_path / "none", None, "holds no finished checkpoint"), (tmp_path / "run", 4, "[3, 6]"))
    for run, step, error in bad:
        with pytest.raises(SystemExit, match=re.escape(error)):
            denormals.checkpoint_of(run, step)


def test_code_entropy_splits_background_from_ink_and_reads_a_demo_run(tmp_path):
    # bench/code_entropy.py: the ink mask and the statistics on hand-made codes, then a whole (tiny) run folder
    import numpy as np
    import yaml

    from dalle_repro.data import shapes
    from dalle_repro.data.writer import Sample, encode_image, write_tar

    ce = bench_script("code_entropy")
    images = np.full((2, 8, 8, 3), 250, np.uint8)
    images[0, 0:2, 2:4] = (255, 0, 0)  # ink in patch (0, 1) of a 4x4 grid
    images[1, 7, 7] = (0, 0, 255)  # and in patch (3, 3)
    images[1, 3, 3] = (220, 230, 240)  # 36 levels off the paper: noise, not ink
    ink = ce.ink_patches(images, (250, 250, 250), 4, 60)
    assert ink.sum() == 2 and ink[0, 0, 1] and ink[1, 3, 3]
    with pytest.raises(ValueError, match="do not split into a 3x3 grid"):
        ce.ink_patches(images, (250, 250, 250), 3, 60)
    tokens = np.zeros((2, 4, 4), np.int64)
    tokens[0, 0, 1], tokens[1, 3, 3] = 1, 2  # two ink codes, equally often
    tokens[1, 0, 0] = 3  # one background position of 30 on another code
    stats = ce.code_stats(tokens, ink, vocab=8)
    h_bg = -(29 / 30 * np.log(29 / 30) + 1 / 30 * np.log(1 / 30))
    assert stats["perplexity_ink"] == 2.0 and stats["perplexity_background"] == round(float(np.exp(h_bg)), 1)
    assert (stats["codes_used"], stats["codes_used_background"], stats["codes_used_ink"]) == (4, 2, 2)
    assert stats["background_codes_per_image"] == 1.5 and stats["background_positions_per_image"] == 15.0
    spent_bg, spent_ink = h_bg * 30 / 32, np.log(2) * 2 / 32
    assert stats["background_share_of_entropy"] == round(spent_bg / (spent_bg + spent_ink), 3)

    # a run folder as the demo leaves it: config.yaml, its data's training shards, the dVAE, an evaluation
    run = tmp_path / "clone" / "outputs" / "demo"
    (run / "evaluation").mkdir(parents=True)
    cfg = {"out_dir": "outputs/demo", "dataset": "shapes", "shapes": {"output": "data/shapes"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    scene = shapes.parse_caption("a big red square on the left")
    pngs = [encode_image(shapes.render(scene, 16, seed=i), "png")[0] for i in range(5)]
    samples = [Sample(f"k{i}", png, "png", "c", {}) for i, png in enumerate(pngs)]
    write_tar(tmp_path / "clone" / "data" / "shapes" / "train" / "000000.tar", samples)
    torch.manual_seed(0)
    DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16, n_init=8)).save_pretrained(
        run / "dvae" / "dvae"
    )
    rates = {"all": {"rate": 0.5}, "two_objects": {"rate": 0.25}, "shapes_swapped": {"rate": 0.125}}
    evaluation = {"splits": {"seen": {"tasks": {"reranked": rates}}}}
    (run / "evaluation" / "evaluation.json").write_text(json.dumps(evaluation))
    out = tmp_path / "entropy.json"
    assert ce.main([str(run), "--images", "4", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["runs"]
    assert row["images"] == 4 and row["world"] == "shapes" and row["codebook"] == 16
    assert 0 < row["ink_share"] < 1 and 1 <= row["perplexity"] <= row["codes_used"] <= 16
    assert row["seen"] == {"all": 0.5, "two_objects": 0.25, "shapes_swapped": 0.125}
    assert "prior_val_image_loss" not in row and "heldout" not in row
    moved = tmp_path / "clone" / "outputs" / "elsewhere"
    moved.mkdir()
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="does not end with its config's out_dir"):
        ce.run_stats(moved, 4, 60)


def test_demo_seeds_gives_the_mean_with_its_t_interval_and_no_interval_for_one_run(tmp_path, capsys):
    # bench/demo_seeds.py on hand-made evaluations: two runs get a t-interval, one run none (JSON has no NaN)
    seeds = bench_script("demo_seeds")

    def run(name: str, seen: float, heldout: float) -> Path:
        out = tmp_path / name / "outputs" / "demo"
        (out / "evaluation").mkdir(parents=True)
        splits = {}
        for split, rate in (("seen", seen), ("heldout", heldout)):
            share = {"rate": rate, "ci": [rate - 0.1, rate + 0.05]}
            tasks = {"reranked": {"all": share, "shape": share}, "random_pick": {"all": share}}
            splits[split] = {"tasks": tasks, "ceilings": {"reader": {"all": share}, "dvae": {"all": share}}}
        (out / "evaluation" / "evaluation.json").write_text(json.dumps({"splits": splits}))
        return out

    a, b = run("s0", 0.9, 0.6), run("s1", 0.8, 0.4)
    out = tmp_path / "seeds.json"
    assert seeds.main([str(a), str(b), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    held = summary["heldout"]["clip_all"]
    # mean 0.5, sd 0.141, t(1) = 12.706: a half-width of 1.27, clipped to the shares' [0, 1]
    assert held["mean"] == pytest.approx(0.5) and held["ci_over_seeds"] == [0.0, 1.0]
    assert summary["seen"]["clip_all"]["values"] == [0.9, 0.8] and "clip_binding" not in summary["seen"]
    assert seeds.main([str(a), "--out", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["summary"]["seen"]["clip_all"]["ci_over_seeds"] == [None, None]
    assert "90.0% (one run)" in capsys.readouterr().out
    assert seeds.mean_ci([0.5, 0.6, 0.7]) == pytest.approx(
        (0.6, 0.6 - 4.303 * 0.1 / math.sqrt(3), 0.6 + 4.303 * 0.1 / math.sqrt(3))
    )
    assert seeds.main([str(tmp_path / "none")]) == 2
