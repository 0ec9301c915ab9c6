"""Untrusted files: nothing is unpickled without a flag, checkpoints are safetensors/JSON/YAML only,
and a checkpoint that does not fit the model is refused with the list of mismatched tensors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, launch_env, prior_overrides

from dalle_repro.core.config import load_config, save_config
from dalle_repro.train.deepspeed import load_state, save_state
from dalle_repro.train.prior import train
from dalle_repro.train.prior_config import PriorTrainConfig

pytest.importorskip("deepspeed")

UNPICKLING = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|dill\.")


class Payload:
    """Unpickling this creates a file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_only_the_flagged_converter_unpickles():
    hits = {}
    for folder in ("dalle_repro", "launch", "tools", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if UNPICKLING.search(code) and "weights_only=True" not in code:  # tensors-only loading is safe
                    hits.setdefault(str(path.relative_to(ROOT)), []).append(n)
    assert set(hits) == {"dalle_repro/cli/convert_openai_dvae.py"}, hits
    source = (ROOT / "dalle_repro" / "cli" / "convert_openai_dvae.py").read_text()
    assert 'if not flags["trust_pickle"]' in source  # nothing is unpickled without the flag


def test_fid_inception_weights_load_tensors_only(tmp_path):
    """evaluation/inception.py reads pytorch-fid's .pth with torch.load(weights_only=True): a pickle that
    would run code is refused, and nothing runs."""
    import torch

    from dalle_repro.evaluation.inception import FIDInception

    marker = tmp_path / "ran"
    torch.save({"w": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="tensors only"):
        FIDInception.from_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_deepspeed_state_round_trip_keeps_types(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    state = {
        "module": {"w": torch.randn(3, 4), "b": torch.arange(4)},
        "optimizer": {
            "state": {0: {"exp_avg": torch.ones(2)}},
            "param_groups": [{"betas": (0.9, 0.96), "params": [0]}],
        },
        "param_shapes": [{"w": torch.Size([3, 4])}],
        "dtype": torch.bfloat16,
        "scaler": DynamicLossScaler(2.0**8, 1000, 1.0, 2, False),
        "skipped": 0,
        "ds_version": "x",
    }
    base = torch.zeros(10)
    state["views"] = [base[:5], base[5:]]  # views of one buffer (safetensors refuses shared memory)
    save_state(state, tmp_path / "s.pt")
    back = load_state(tmp_path / "s.pt")
    assert torch.equal(back["module"]["w"], state["module"]["w"])
    assert back["optimizer"]["state"][0]["exp_avg"].tolist() == [1, 1]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.96)
    assert isinstance(back["param_shapes"][0]["w"], torch.Size)
    assert back["dtype"] is torch.bfloat16
    assert isinstance(back["scaler"], DynamicLossScaler) and back["scaler"].cur_scale == 2.0**8
    with pytest.raises(TypeError, match="Payload"):
        save_state({"x": Payload(tmp_path / "never")}, tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def prior_run(prior_data, tmp_path_factory):
    """Two checkpoints (steps 2 and 4) of a ZeRO-1 prior run in one process."""
    root = tmp_path_factory.mktemp("untrusted")
    over = prior_overrides(prior_data, root / "run", "run.steps=4", "run.ckpt_every=2", "deepspeed.zero_stage=1")
    cfg = load_config(PriorTrainConfig, None, over)
    train(cfg)
    return root, cfg, over


def test_every_checkpoint_file_is_safetensors_json_or_yaml(prior_run):
    root, _, _ = prior_run
    files = [p for p in (root / "run" / "checkpoints").rglob("*") if p.is_file()]
    assert any("deepspeed" in p.parts for p in files)
    for p in files:
        head = p.read_bytes()[:16]
        if p.suffix in (".json", ".yaml"):
            continue
        assert not head.startswith((b"\x80", b"PK")), f"{p} is a pickle or a torch.save zip"
        size = int.from_bytes(head[:8], "little")  # safetensors: 8-byte header length, then JSON
        assert p.read_bytes()[8 : 8 + size].startswith(b"{"), p


def test_a_planted_pickle_is_refused_and_never_runs(prior_run, tmp_path):
    root, _, over = prior_run
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(run)], check=True)
    target = next((run / "checkpoints" / "deepspeed" / "step_00000004").glob("mp_rank_00_model_states.pt"))
    marker = tmp_path / "code-ran"
    torch.save({"module": Payload(marker)}, target)  # what a hostile (or a stock DeepSpeed) file holds
    cfg = save_config(load_config(PriorTrainConfig, None, [*over, f"run.run_dir={run}", "run.steps=6"]), tmp_path)
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train_prior.py"), "--config", str(cfg), "--resume"],
        capture_output=True,
        text=True,
        env=launch_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "never unpickles" in r.stderr and target.name in r.stderr, r.stderr[-2000:]
    assert not marker.exists(), "the pickle's code ran"


def test_resuming_with_another_model_lists_the_mismatched_tensors(prior_run, tmp_path):
    root, _, over = prior_run
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(run)], check=True)
    before = (run / "config.yaml").read_text()
    cfg = load_config(PriorTrainConfig, None, [*over, f"run.run_dir={run}", "run.steps=6", "model.dim=48"])
    with pytest.raises(ValueError) as e:
        train(cfg, resume_run=True)
    msg = str(e.value)
    assert "step_00000004" in msg and "does not fit the model" in msg
    assert "wrong shape" in msg and "blocks.0.attn.qkv.weight: checkpoint (96, 32) vs model (144, 48)" in msg, msg
    assert "model.dim: 32 in the checkpoint, 48 now" in msg, msg
    assert (run / "config.yaml").read_text() == before  # the run's own config is kept
    assert json.loads((run / "checkpoints" / "step_00000004" / "state.json").read_text())["step"] == 4
    assert os.listdir(run / "checkpoints")  # nothing was removed
