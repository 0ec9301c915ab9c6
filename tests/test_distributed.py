"""dalle_repro.core.distributed: device picking, the CPU allocator tuning and the threads per rank."""

import json
import os
import platform
import subprocess

import pytest
import torch
from helpers import launch_env, launcher

from dalle_repro.core import distributed


def test_pick_device_rejects_unknown_names():
    with pytest.raises(ValueError, match="'tpu'"):
        distributed.pick_device("tpu")
    assert distributed.pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("DALLE_REPRO_MALLOC", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    assert distributed.tune_cpu_allocator() == {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}


@pytest.mark.parametrize(
    "var,value", [("DALLE_REPRO_MALLOC", "off"), ("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")]
)
def test_allocator_tuning_steps_aside_when_the_user_chose(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert distributed.tune_cpu_allocator() == {}


def test_cpu_threads_divides_the_usable_cores_among_the_ranks_on_the_node():
    assert distributed.cpu_threads({"LOCAL_WORLD_SIZE": "2"}, 2)[0] == 1  # torchrun
    assert distributed.cpu_threads({"LOCAL_SIZE": "2"}, 2)[0] == 1  # deepspeed's launcher
    assert distributed.cpu_threads({"LOCAL_SIZE": "3"}, 8)[0] == 2  # never more threads than cores
    assert distributed.cpu_threads({"LOCAL_WORLD_SIZE": "4"}, 2)[0] == 1  # at least one
    assert distributed.cpu_threads({}, 6)[0] == 6  # one rank: every usable core


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_cpu_threads_leaves_an_explicit_thread_count_alone(var):
    n, why = distributed.cpu_threads({var: "3", "LOCAL_WORLD_SIZE": "2"}, 2)
    assert n is None and f"{var}=3" in why


@pytest.fixture
def threads_restored(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(distributed, "_threads_left", before)
    for var in (*distributed.THREAD_VARS, *distributed.LOCAL_SIZE_VARS):
        monkeypatch.delenv(var, raising=False)
    yield before
    torch.set_num_threads(before)


def test_pick_device_runs_one_thread_per_rank_of_two_on_two_cores(monkeypatch, threads_restored):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    distributed.pick_device("cpu")
    assert torch.get_num_threads() == 1


def test_pick_device_respects_omp_num_threads_and_set_num_threads(monkeypatch, threads_restored):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads_restored))
    assert distributed.set_cpu_threads() == (threads_restored, f"OMP_NUM_THREADS={threads_restored} in the environment")
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(3)  # the caller's own choice, after import
    assert distributed.set_cpu_threads() == (3, "torch.set_num_threads by the caller")
    assert torch.get_num_threads() == 3


def test_ranks_under_the_deepspeed_launcher_split_the_cores(tmp_path):
    """The real launcher's variables (LOCAL_SIZE on CPU) reach the default: cores // 2 per rank."""
    script = tmp_path / "threads.py"
    script.write_text(
        "import json, os, torch\n"
        "from dalle_repro.core import distributed\n"
        "distributed.pick_device('cpu', int(os.environ['LOCAL_RANK']))\n"
        "rank = os.environ['LOCAL_RANK']\n"
        f"open({str(tmp_path)!r} + f'/threads-{{rank}}.json', 'w').write(json.dumps([rank, torch.get_num_threads()]))\n"
    )  # a file per rank: two ranks printing to one pipe interleave their writes (seen: "THREADSTHREADS")
    env = {k: v for k, v in launch_env().items() if k not in distributed.THREAD_VARS}
    cmd = [launcher(), "--num_gpus", "2", "--master_port", str(distributed.free_port()), str(script)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = sorted(json.loads(p.read_text()) for p in tmp_path.glob("threads-*.json"))
    expected = max(1, distributed.usable_cores() // 2)
    assert seen == [["0", expected], ["1", expected]], r.stdout[-2000:]


def test_a_stale_deepspeed_build_lock_and_the_first_compile_are_announced(tmp_path, monkeypatch):
    """A DeepSpeed op build killed midway left torch's lock file, and every later start hung
    without a word (seen here: a killed test run hung the next suite for 20 minutes)."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    notes = distributed.extension_notes(torch.device("cpu"))
    assert len(notes) == 1 and "compiles its CPU communication op" in notes[0]
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.write_bytes(b"")
    assert distributed.extension_notes(torch.device("cpu")) == []  # a fresh lock: a build is running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    (note,) = distributed.extension_notes(torch.device("cpu"))
    assert str(lock) in note and "60 minutes" in note and "delete it" in note
    assert distributed.extension_notes(torch.device("cuda")) == []
