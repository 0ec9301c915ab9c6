"""The paper's per-resblock skip, exact under DeepSpeed at ZeRO 0-3 with 2 ranks (fault injection),
and the per-branch gradient scales independent of the number of ranks (issue 17, items 1-2).

The ranks run ``zero_worker.py`` as plain processes in one gloo group (no launcher: it would add a
compile and a second of start-up per run)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("zero_worker.py")
ROOT = WORKER.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, out: Path, world: int) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=str(ROOT),
        )
        log = open(out / f"{mode}_{world}_rank{rank}.log", "w")
        procs.append(
            (subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], env=env, stdout=log, stderr=log), log)
        )
    for p, log in procs:
        p.wait(timeout=600)
        log.close()
    for rank, (p, _) in enumerate(procs):
        if p.returncode:
            text = (out / f"{mode}_{world}_rank{rank}.log").read_text()
            pytest.fail(f"rank {rank} of {world} exited {p.returncode}:\n{text[-3000:]}")


@pytest.fixture(scope="module")
def skip_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_skip")
    run_ranks("skip", out, 2)
    return out, json.loads((out / "skip.json").read_text())


def states(out: Path, stage: int, run: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"stage{stage}_{run}_{step}.safetensors"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_skipped_branch_is_bit_identical_and_the_rest_move_as_without_the_fault(skip_runs, stage):
    out, records = skip_runs
    fault, clean = records[f"stage{stage}_fault"], records[f"stage{stage}_clean"]
    step = 1  # zero_worker.FAULT_STEP
    assert fault["skipped"] == [[], [2], []], "the inf on rank 1 must skip branch 2 on both ranks, only then"
    assert clean["skipped"] == [[], [], []]
    branch = set(fault["branch"])
    before, after = states(out, stage, "fault", step - 1), states(out, stage, "fault", step)
    without = states(out, stage, "clean", step)
    assert after.keys() == without.keys() and any(":exp_avg" in k for k in after)
    moved = 0
    for key, value in after.items():
        name = key.split(":")[0]
        if name in branch:  # the weight, its fp32 master and both Adam moments: untouched
            assert torch.equal(value, before[key]), f"ZeRO {stage}: skipped {key} changed"
        else:  # the rest: bit for bit as in the run without the fault
            assert torch.equal(value, without[key]), f"ZeRO {stage}: {key} differs from the clean run"
            moved += int(not torch.equal(value, before[key]))
    assert moved > 10, "the other parameters must have updated"
    # in the clean run the branch does update: the test would see a partial skip
    assert any(not torch.equal(without[n], before[n]) for n in branch)
    # the update after the skip goes on normally for the skipped branch
    later = states(out, stage, "fault", step + 1)
    assert all(not torch.equal(later[n], after[n]) for n in branch)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_gradient_norm_leaves_the_skipped_branch_out(skip_runs, stage):
    """DeepSpeed's global norm (what the clip uses) at the faulty update counts every branch but the
    skipped one; its finite part (the inf is zeroed, the rest of that gradient is not) would count
    at ZeRO 1-3 if its gradient were not zeroed."""
    out, records = skip_runs
    fault, clean = records[f"stage{stage}_fault"], records[f"stage{stage}_clean"]
    assert fault["grad_norm"][0] == pytest.approx(clean["grad_norm"][0], rel=1e-6)
    assert fault["grad_norm"][1] < clean["grad_norm"][1] * (1 - 1e-4)


def test_branch_scales_follow_the_same_sequence_at_one_rank_and_at_two(tmp_path):
    """Each rank's loss is its own mean, so its gradients inside a branch have one rank's range:
    the scales carry no factor of the rank count, and at 2 ranks they, and the overflows they
    cause, follow one rank's on the same global batch."""
    run_ranks("scale", tmp_path, 1)
    run_ranks("scale", tmp_path, 2)
    one, two = (json.loads((tmp_path / f"scale_{w}.json").read_text()) for w in (1, 2))
    assert any(one["skipped"]), "fp16 overflows must occur for the test to mean anything"
    assert two["skipped"] == one["skipped"]
    flat = [[x for row in run["scales"] for x in row] for run in (one, two)]
    assert flat[1] == pytest.approx(flat[0], rel=1e-12)
    assert any(0 < len(s) < len(one["scales"][0]) for s in one["skipped"]), "some updates must skip some branches only"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_skip_at_the_very_first_update_leaves_the_branch_as_initialised(skip_runs, stage):
    """Before the first update Adam has no moments yet (and DeepSpeed 0.19 links the second param
    group's only after it): the skipped branch keeps its initial weights and zero moments, the rest
    move as in the clean run."""
    out, records = skip_runs
    assert records[f"stage{stage}_fault0"]["skipped"] == [[2], [], []]
    branch = set(records[f"stage{stage}_fault0"]["branch"])
    init, after = states(out, stage, "fault0", "init"), states(out, stage, "fault0", 0)
    without = states(out, stage, "clean", 0)
    for key, value in after.items():
        name = key.split(":")[0]
        if name in branch:
            assert torch.equal(value, init[key]) if ":" not in key else not value.any(), f"ZeRO {stage}: {key}"
        else:
            assert torch.equal(value, without[key]), f"ZeRO {stage}: {key} differs from the clean run"
