"""How the trainers' commands end: SIGTERM handling, and the exit status and message of an error.

Every rank of a run checks the same config and the same files, so a bad value fails on each of
them with the same message: only rank 0 prints it, so that a user reads it once, not once per rank.
Exit status 2: a config or input error; 3: a dead run (too many non-finite losses in a row, or a
dVAE whose codebook collapsed).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dalle_repro.core import distributed
from dalle_repro.core.config import ConfigError
from dalle_repro.train.dvae import CodebookCollapsed
from dalle_repro.train.loop import NonFiniteLosses, StopRequested

INPUT_ERRORS = (ConfigError, FileExistsError, FileNotFoundError, ValueError)


def print_error(e: BaseException) -> None:
    """``error: ...`` on stderr, from rank 0 only (the launcher's RANK; a lone process is rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {e}", file=sys.stderr, flush=True)


def run_trainer(train: Callable[[StopRequested], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Run ``train`` with SIGTERM/SIGINT caught (the run stops after its update, with a checkpoint);
    returns (exit status, its result).

    The process group the run joined is destroyed before returning, however the run ended: a gloo
    group left to the interpreter's exit can abort the process from one of its threads ("terminate
    called without an active exception", exit status 250 under the launcher) after the run has
    finished and written its export, which turned finished runs into failed ones now and then."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = StopRequested()
    stop.install()
    try:
        return 0, train(stop)
    except INPUT_ERRORS as e:
        print_error(e)
        return 2, {}
    except (NonFiniteLosses, CodebookCollapsed) as e:
        print_error(e)
        return 3, {}
    finally:
        distributed.close()
        for sig, handler in previous.items():  # a caller in the same process gets its own back
            signal.signal(sig, handler)


def print_written(run: str | os.PathLike[str], model: str, reader: str) -> None:
    """A trainer's last line, from rank 0 only: what the run folder holds now, and the model folder
    ``RUN/model`` that ``reader`` reads (a stopped run has none yet)."""
    if os.environ.get("RANK", "0") != "0":
        return
    run = Path(run)
    if (run / model / "model.safetensors").is_file():
        what = f"; the {reader}: {run / model}"
    else:
        what = f"; no {model}/ yet (the run stopped early: --resume continues it)"
    print(f"wrote config.yaml, metrics.jsonl and checkpoints/ in {run}{what}")
