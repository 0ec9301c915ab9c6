"""The command-line tools and the demo, run as a user runs them, and the README kept true to them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_folder, needs_emoji

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [
    "tools/make_shards.py",
    "tools/make_emoji_dataset.py",
    "tools/train_tokenizer.py",
    "tools/train_clip.py",
    "tools/memory_table.py",
    "launch/train_prior.py",
    "launch/sample.py",
    "tools/convert_openai_dvae.py",
    "tools/encode_tokens.py",
    "tools/make_shapes_dataset.py",
    "tools/make_strokes_dataset.py",
    "tools/evaluate.py",
    "tools/make_pattern_folder.py",
    "launch/serve.py",
]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tool", TOOLS + ["launch/demo.py", "launch/train_dvae.py", "bench/run.py"])
def test_help_explains_itself(tool):
    r = run(str(ROOT / tool), "--help")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) > 400


@pytest.mark.parametrize("tool", TOOLS)
def test_the_docs_document_every_option(tool):
    readme = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    options = set(re.findall(r"(--[a-z][a-z-]+)", run(str(ROOT / tool), "--help").stdout)) - {"--help"}
    missing = [o for o in sorted(options) if f"`{o}" not in readme]
    assert not missing, f"neither the README nor docs/ document {missing} of {tool}"


def test_make_shards_cli(tmp_path):
    src = make_folder(tmp_path / "src", 5)
    r = run(
        str(ROOT / "tools/make_shards.py"),
        "--input",
        str(src),
        "--output",
        str(tmp_path / "out"),
        "--shard-size",
        "2",
        "--image-size",
        "8",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["written"] == 5
    r = run(str(ROOT / "tools/make_shards.py"), "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2"))
    assert r.returncode == 2 and "nope" in r.stderr
    r = run(
        str(ROOT / "tools/make_shards.py"),
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o3"),
        "--val-fraction",
        "1.5",
    )
    assert r.returncode == 2 and "--val-fraction" in r.stderr
    # nothing to write used to exit 0: an empty folder, and captions in files of another name
    (tmp_path / "empty").mkdir()
    r = run(str(ROOT / "tools/make_shards.py"), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o4"))
    assert r.returncode == 1 and "nothing was written" in r.stderr
    for txt in src.glob("*.txt"):
        txt.rename(txt.with_suffix(".caption"))
    r = run(str(ROOT / "tools/make_shards.py"), "--input", str(src), "--output", str(tmp_path / "o5"))
    assert r.returncode == 1 and "missing_caption 5" in r.stderr and "STEM.txt" in r.stderr


@needs_emoji
def test_emoji_and_tokenizer_cli(tmp_path):
    r = run(
        str(ROOT / "tools/make_emoji_dataset.py"),
        "--output",
        str(tmp_path / "e"),
        "--limit",
        "40",
        "--image-size",
        "16",
        "--shard-size",
        "8",
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "e" / "train").glob("*.tar"))) >= 1
    r = run(
        str(ROOT / "tools/train_tokenizer.py"),
        "--shards",
        str(tmp_path / "e" / "train" / "*.tar"),
        "--vocab-size",
        "300",
        "--output",
        str(tmp_path / "tok.json"),
    )
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.splitlines()[0])
    assert stats["captions_read"] > 20 and 256 < stats["vocab_size"] <= 300
    r = run(str(ROOT / "tools/train_tokenizer.py"), "--shards", str(tmp_path / "none*.tar"), "--output", "x.json")
    assert r.returncode == 2 and "matches no file" in r.stderr


def test_demo_runs_resumes_and_rejects_bad_config(tmp_path):
    """The README's first command at a tiny size: every stage on the shapes set, the zero-shot report."""
    over = [
        f"out_dir={tmp_path}/out",
        f"shapes.output={tmp_path}/shapes",
        "shapes.train=80",
        "shapes.heldout=12",
        "shapes.unlabelled=40",
        "shapes.image_size=16",
        "shapes.shard_size=10",
        "shapes.val_fraction=0.1",
        f"text.path={tmp_path}/tok.json",
        "bpe.vocab_size=300",
        f"tokens_output={tmp_path}/tokens",
        "dvae_overrides=[model.image_size=16,model.n_hid=8,model.vocab_size=32,"
        "run.steps=4,run.val_every=4,run.ckpt_every=4,data.batch_size=8,data.num_workers=0]",
        "prior_overrides=[model.dim=32,model.depth=4,model.heads=4,model.conv_kernel=3,run.steps=3,"
        "run.val_every=3,run.ckpt_every=3,run.sample_every=3,data.batch_size=4,data.num_workers=0,run.val_batches=1]",
        "clip.model.image_size=16",
        "clip.model.patch_size=8",
        "clip.model.width=32",
        "clip.model.layers=1",
        "clip.run.steps=3",
        "clip.data.batch_size=8",
        "clip.data.num_workers=0",
        "captions_train=[a big red circle on the left]",
        "captions_val=1",
        "captions_new=[a big red triangle on the right]",
        "sample.candidates=3",
        "sample.keep=2",
        "evaluation.captions=2",
        "evaluation.sample.candidates=2",
        "evaluation.pictures=1",
    ]
    r = run(str(ROOT / "launch/demo.py"), *over)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "data_preview.png").is_file() and (tmp_path / "tok.json").is_file()
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert "[data] running" in r.stdout and "[evaluate] running" in r.stdout
    assert (tmp_path / "out" / "dvae" / "dvae" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "dvae" / "recon_latest.png").is_file()
    assert json.loads((tmp_path / "tokens" / "summary.json").read_text())["written"] == 80  # not heldout/
    ev = json.loads((tmp_path / "out" / "evaluation" / "evaluation.json").read_text())
    assert set(ev["splits"]) == {"seen", "heldout"} and ev["splits"]["heldout"]["prompts"] == 2
    assert all(Path(p).is_file() for p in ev["plots"].values()) and len(ev["plots"]) == 3
    # tools/evaluate.py with the command the report prints gives the report's numbers
    command = json.loads((tmp_path / "out" / "stages" / "evaluate.json").read_text())["result"]["command"]
    args = shlex.split(command)[2:]
    args[args.index("--output") + 1] = str(tmp_path / "again")
    import torch

    from dalle_repro.evaluation.inception import FIDInception

    torch.save(FIDInception().state_dict(), tmp_path / "inception.pth")  # random weights: the path, not the values
    r = run(
        str(ROOT / "tools/evaluate.py"), *args, "--inception", str(tmp_path / "inception.pth"), "--blur-radii", "0,2"
    )
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    for rep in again["splits"].values():
        assert set(rep.pop("fid_by_blur")) == {"0", "2"}
    assert again["splits"] == ev["splits"] and Path(again["plots"]["fid_by_blur"]).is_file()
    r = run(str(ROOT / "launch/demo.py"), *over)
    assert r.returncode == 0 and r.stdout.count("done before, skipped") == 10
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Zero-shot: held-out colour-shape pairs" in report and "| heldout (2 x 2) |" in report
    assert "FID: not computed" in report  # no evaluation.inception given
    assert "validation PSNR" in report and "Samples for" in report and "tools/evaluate.py --model" in report
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())  # the tiny runs fit: nothing shortened
    assert plan["fraction"] == 1.0 and plan["planned_updates"] == {"dvae": 4, "prior": 3, "clip": 3}
    assert "Time plan:" in report and plan["seconds_per_update"]["prior"] > 0
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()
    samples = json.loads((tmp_path / "out" / "samples" / "samples.json").read_text())
    assert [s["split"] for s in samples] == ["train", "validation", "new"] and len(samples[0]["scores"]) == 2
    # which stages a changed setting reruns: tests/test_demo.py (the fingerprints, without running them)
    r = run(str(ROOT / "launch/demo.py"), *over, "data.batch_sise=4")
    assert r.returncode == 2 and "data.batch_sise" in r.stderr and "data.batch_size" in r.stderr


def test_evaluate_cli_on_images_and_on_a_dvae(tmp_path):
    """tools/evaluate.py --images (a folder of captioned PNGs) and --dvae, against reference shards."""
    import numpy as np
    import torch

    from dalle_repro.data.shapes import build_shapes_dataset, random_scene, render
    from dalle_repro.models.dvae import DVAE, DVAEArgs

    build_shapes_dataset(tmp_path / "shapes", n_train=20, n_heldout=4, shard_size=10, val_fraction=0.2)
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        scene = random_scene(rng, False)
        render(scene, 32, seed=100 + i).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(scene.caption() if i else "a big red circle on the left")
    ref = f"{tmp_path}/shapes/val/*.tar"
    r = run(
        str(ROOT / "tools/evaluate.py"),
        "--images",
        str(folder),
        "--reference",
        ref,
        "--attributes",
        "--output",
        str(tmp_path / "ev_images"),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "ev_images" / "evaluation.json").read_text())
    assert out["generated_images"] == 6 and out["attributes_reference"]["all"] == 1.0
    assert 0.5 <= out["attributes"]["all"] < 1.0  # one image was given another scene's caption
    torch.manual_seed(0)
    DVAE(DVAEArgs(image_size=32, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8)).save_pretrained(
        tmp_path / "dvae"
    )
    r = run(
        str(ROOT / "tools/evaluate.py"),
        "--dvae",
        str(tmp_path / "dvae"),
        "--reference",
        ref,
        "--output",
        str(tmp_path / "ev_dvae"),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "ev_dvae" / "evaluation.json").read_text())
    assert 0 < out["psnr"] < 30 and out["bits_per_dim"] > 0 and "fid" not in out  # no --inception: no FID
    r = run(str(ROOT / "tools/evaluate.py"), "--images", str(folder), "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "--reference" in r.stderr
    r = run(
        str(ROOT / "tools/evaluate.py"),
        "--dvae",
        str(tmp_path / "dvae"),
        "--reference",
        ref,
        "--inception",
        str(tmp_path / "nope.pth"),
        "--output",
        str(tmp_path / "x"),
    )
    assert r.returncode == 2 and "nothing here downloads" in r.stderr


def test_lint_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment")
    r = subprocess.run([str(ruff), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_memory_table_counts_parameters_and_shards_by_zero_stage():
    r = run(str(ROOT / "tools/memory_table.py"), "--gpus", "8", "64")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 12  # 3 configs x 2 rank counts x (the mode it runs, the paper's storage)
    cells = {(row.split("|")[1].strip(), row.split("|")[6].strip()): row.split("|") for row in rows}
    paper8 = cells[("`configs/paper/prior.yaml` (block_scaled)", "8")]
    paper64 = cells[("`configs/paper/prior.yaml` (block_scaled)", "64")]
    stored8 = cells[("`configs/paper/prior.yaml` as the paper stores it", "8")]
    assert paper8[2].strip() == "12.29B"
    gib = lambda c: float(c.strip().split()[0])  # noqa: E731
    assert gib(paper8[7]) == pytest.approx(8 * gib(paper64[7]), rel=0.1)  # ZeRO-3 shards the weights
    # 16-bit weight matrices: a bit over half the fp32 bytes (embeddings and heads stay fp32)
    assert 0.5 < gib(stored8[7]) / gib(paper8[7]) < 0.55


def test_memory_table_of_fine_tuning_shrinks_with_what_is_frozen():
    r = run(str(ROOT / "tools/memory_table.py"), "configs/gpu/prior-350m.yaml", "--finetune", "--gpus", "1", "8")
    assert r.returncode == 0, r.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in r.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 * (1 + 4)  # 3 freeze choices x (one rank: stage 0; 8 ranks: stages 0-3)
    gib = lambda c: float(c.split()[0])  # noqa: E731
    one = {row[2]: row for row in rows if row[5] == "1"}
    assert gib(one["body"][10]) < gib(one["embeddings,layers:half"][10]) < gib(one["nothing"][10])
    assert float(one["body"][3][:-1]) < 0.1 * float(one["nothing"][3][:-1])  # trainable: the output only
    assert all(row[11].endswith("GB") for row in rows)
    eight = [row for row in rows if row[5] == "8" and row[2] == "nothing"]
    assert [row[4] for row in eight] == ["0", "1", "2", "3"] and gib(eight[3][10]) < gib(eight[0][10])


@pytest.mark.parametrize(
    "script", ["launch/train_dvae.py", "launch/train_prior.py", "launch/demo.py", "tools/train_clip.py"]
)
def test_help_texts_are_plain_and_keep_their_examples(script):
    """Issue 18 item 21: --help leaked the spec's "[?]" marker, "SPEC §3" (no such file in the
    repository) and RST backticks, and train_clip's example collapsed into one line."""
    r = run(str(ROOT / script), "--help")
    assert r.returncode == 0, r.stderr
    for leak in ("[?]", "SPEC §", "``"):
        assert leak not in r.stdout, f"{script} --help shows {leak!r}"
    if script == "tools/train_clip.py":
        assert "\n  python tools/train_clip.py 'data.shards=" in r.stdout and "\n      text.path=" in r.stdout
        assert "data.shards (str)" in r.stdout and "run.run_dir (str)" in r.stdout


def test_trainer_errors_print_once_from_rank_zero(monkeypatch, capsys):
    """Every rank checks the same config: the message is printed by rank 0 alone, with exit status 2
    (3 for non-finite losses)."""
    from dalle_repro.cli.errors import run_trainer
    from dalle_repro.core.config import ConfigError
    from dalle_repro.train.loop import NonFiniteLosses

    def bad(stop):
        raise ConfigError("data.shards: broken")

    monkeypatch.setenv("RANK", "1")
    assert run_trainer(bad) == (2, {}) and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_trainer(bad) == (2, {}) and capsys.readouterr().err == "error: data.shards: broken\n"

    def diverging(stop):
        raise NonFiniteLosses("3 non-finite losses in a row")

    assert run_trainer(diverging)[0] == 3


def test_trainers_destroy_their_process_group_however_they_end(monkeypatch):
    """A gloo group left to the interpreter's exit can abort a finished rank (exit 250): run_trainer
    destroys the group the run joined, after a finished run and after an error alike."""
    import torch.distributed as dist

    from dalle_repro.cli.errors import run_trainer
    from dalle_repro.core import distributed
    from dalle_repro.core.config import ConfigError

    port = str(distributed.free_port())
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(k, v)

    def finished(stop):
        distributed.init("cpu", require_group=True)
        assert dist.is_initialized()
        return {"ended": "done"}

    def broken(stop):
        distributed.init("cpu", require_group=True)
        raise ConfigError("data.shards: broken")

    assert run_trainer(finished) == (0, {"ended": "done"}) and not dist.is_initialized()
    monkeypatch.setenv("MASTER_PORT", str(distributed.free_port()))
    assert run_trainer(broken) == (2, {}) and not dist.is_initialized()


def test_a_group_joined_outside_run_trainer_is_destroyed_at_exit():
    """A trainer called directly (a notebook, a benchmark) does not go through run_trainer: the
    group it joined is destroyed by the exit functions, before the interpreter's teardown."""
    code = (
        "import atexit, torch.distributed as dist\n"
        "from dalle_repro.core import distributed\n"
        "distributed.init('cpu', require_group=True)\n"
        "print(dist.is_initialized())\n"
        "atexit._run_exitfuncs()\n"
        "print(dist.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
