"""Process groups for data-parallel runs, under the deepspeed launcher, torchrun, or none.

Launchers describe the job in environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); :func:`init` reads them, picks the device and the backend (NCCL on CUDA, gloo on
CPU), and returns a :class:`Dist`. A plain ``python script.py`` is a world of one and needs no
process group.

On CPU, :func:`pick_device` also tunes glibc's allocator (:func:`tune_cpu_allocator`) and sets
the intra-op thread count (:func:`set_cpu_threads`): the usable cores divided among the ranks on
this node, so that the 2 CPU ranks of the demo on 2 cores run one thread each instead of 2 x 2.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    tune_cpu_allocator()
    threads, why = set_cpu_threads()
    if local_rank == 0:
        log.info("intra-op threads per rank: %d (%s)", threads, why)
    return torch.device("cpu")


# Where launchers put the number of ranks on this node: torchrun, DeepSpeed's launcher (CPU and GPU
# alike; launcher/launch.py), Open MPI (DeepSpeed's MPI runners), MPICH / Intel MPI.
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
# Set by the user (or a launcher that binds cores, e.g. deepspeed --bind_cores_to_rank, torchrun's
# OMP_NUM_THREADS=1): PyTorch reads them at start-up, and they win over our default.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups cpusets, SLURM)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads(environ: Mapping[str, str], cores: int) -> tuple[int | None, str]:
    """The default intra-op threads of one rank, and why; None where the environment chose already.

    PyTorch's own default gives each process every core it may run on: two ranks on two cores then
    run four busy OpenMP threads, and each parallel region waits at its barrier for whichever thread
    is off its core, so a step can slow far more than the lost cores explain (bench/contention.py
    measures it). Ours: ``cores // ranks on this node``, at least 1. It assumes the ranks share one
    affinity mask, as the launchers leave it; a launcher that binds cores per rank sets
    OMP_NUM_THREADS too, which wins.
    """
    for var in THREAD_VARS:
        if environ.get(var, "").strip():
            return None, f"{var}={environ[var].strip()} in the environment"
    for var in LOCAL_SIZE_VARS:
        value = environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            ranks = int(value)
            return max(1, cores // ranks), f"{cores} usable cores / {ranks} ranks on this node ({var}={ranks})"
    return cores, f"{cores} usable cores, one rank on this node"


# The thread count as we last left it (at import: PyTorch's default, or what the caller set before):
# a different count at the next call means the caller set one since, and theirs stays.
_threads_left = torch.get_num_threads()


def set_cpu_threads() -> tuple[int, str]:
    """Apply :func:`cpu_threads` to this process (torch.set_num_threads) unless the user chose: an
    OMP_NUM_THREADS / MKL_NUM_THREADS, or a torch.set_num_threads call after this module was imported
    (one that sets the count it already had cannot be told apart). Returns the threads this process
    now runs and why. Data-loader workers run one thread each (PyTorch's worker loop sets that)."""
    global _threads_left
    now = torch.get_num_threads()
    if now != _threads_left:
        return now, "torch.set_num_threads by the caller"
    n, why = cpu_threads(os.environ, usable_cores())
    if n is None:
        return now, why
    if n != now:
        torch.set_num_threads(n)
    _threads_left = torch.get_num_threads()
    return _threads_left, why


# What tune_cpu_allocator sets: name, glibc's mallopt parameter (malloc.h), the environment
# variable glibc reads for it at start-up, and our value.
CPU_MALLOC = (
    ("mmap_threshold", -3, "MALLOC_MMAP_THRESHOLD_", 32 << 20),
    ("trim_threshold", -1, "MALLOC_TRIM_THRESHOLD_", 1 << 30),
)


def cpu_malloc_env() -> dict[str, str]:
    """The same settings as glibc environment variables, for a process we do not control."""
    return {var: str(value) for _, _, var, value in CPU_MALLOC}


def tune_cpu_allocator() -> dict[str, int]:
    """Keep freed activation buffers in the heap instead of returning them to the OS each step.

    glibc serves every allocation above its mmap threshold (128 KiB at first, raised only as big
    blocks are freed) with a fresh mmap, and trims the heap's top when more than the trim threshold
    is free, so a CPU training step page-faults its multi-MB activations in anew every time.
    Raising the mmap threshold to 32 MiB (glibc's maximum) and the trim threshold to 1 GiB keeps
    them mapped. Measured with bench/run.py vae_train: about 1.2x on a dVAE step; the memory
    kept is what a step needs at its peak, which it asks for again at the next step anyway.

    Skipped where it cannot apply or the user chose: not glibc, ``DALLE_REPRO_MALLOC=off``, any
    ``MALLOC_*`` variable set, or jemalloc/tcmalloc preloaded. Returns what was set.
    """
    if os.environ.get("DALLE_REPRO_MALLOC", "on").lower() in ("off", "0", "false", "no"):
        return {}
    if any(k.startswith("MALLOC_") for k in os.environ) or any(
        a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc")
    ):
        return {}
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt
        return {}
    return {name: value for name, param, _, value in CPU_MALLOC if mallopt(param, value) == 1}


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: str = "auto", require_group: bool = False) -> Dist:
    """Join the process group the launcher described (if any) and return this process's place in it.

    ``require_group``: make a group even in a world of one (DeepSpeed needs one), so that a plain
    ``python script.py`` gets a local group on a free port.
    """
    if require_group and "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if (world > 1 or require_group) and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        # destroyed at exit at the latest, also where a caller (a notebook, a benchmark) runs a trainer
        # without the commands' run_trainer, which destroys it as the run ends: a gloo group left to
        # the interpreter's teardown can abort the process after the run's work is written
        atexit.register(close)
    return Dist(rank, world, local, dev)


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def total(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """The sum of each value over all ranks."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """The mean of each value over all ranks (identity in a world of one)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world for k, v in total(values, device).items()}


def close() -> None:
    """Destroy the process group. Through DeepSpeed's own call when it has joined the group: that
    also drops the groups DeepSpeed caches (its world and data-parallel groups), which a later run
    in the same process would otherwise use after they were destroyed."""
    if not dist.is_initialized():
        return
    ds = sys.modules.get("deepspeed.comm.comm")
    if ds is not None and getattr(ds, "cdb", None) is not None and hasattr(ds, "destroy_process_group"):
        ds.destroy_process_group()
    else:
        dist.destroy_process_group()


STALE_LOCK_S = 600  # a build takes minutes; a lock older than this was left by a killed build


def extension_notes(device: torch.device, now: float | None = None) -> list[str]:
    """What a DeepSpeed start on this machine will wait for, for the log, before it waits.

    On a CPU, DeepSpeed compiles its communication op with torch's cpp_extension on the first start
    (minutes, silent). A build killed midway (a timeout, Ctrl-C) leaves a ``lock`` file behind, and
    every later start then waits on it forever without a word; a lock older than
    :data:`STALE_LOCK_S` is named here with what to do. One line per finding."""
    if device.type != "cpu":
        return []
    from torch.utils.cpp_extension import get_default_build_root

    tag = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(get_default_build_root()) / tag)
    now = time.time() if now is None else now
    notes = []
    for lock in sorted(root.glob("*/lock")):
        minutes = (now - lock.stat().st_mtime) / 60
        if minutes * 60 > STALE_LOCK_S:
            notes.append(
                f"{lock} has been there for {minutes:.0f} minutes: a DeepSpeed op build killed midway leaves it, "
                "and every later start waits on it forever. If no other run is compiling, delete it."
            )
    shm = root / "deepspeed_shm_comm"
    if not (shm / "deepspeed_shm_comm.so").exists():
        notes.append(f"DeepSpeed compiles its CPU communication op on this first start (minutes, once) into {shm}")
    return notes
