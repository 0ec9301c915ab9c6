"""Training logs: a progress bar, a jsonl file, and wandb when it is installed and enabled.

The progress bar shows only on a terminal; where stderr is not one (a cluster's log file, a pipe),
every logged row is also printed as one plain line instead, so that a run is never silent there.

Only rank 0 writes. wandb is optional: a missing package, or no account (it then runs offline),
never breaks a run; a failing wandb call is logged once and wandb is switched off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dalle_repro.core.config import arg, to_dict
from dalle_repro.core.files import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class LogArgs:
    """Where and how often training reports."""

    every: int = arg(10, "Steps between log lines (jsonl, progress bar, wandb).", gt=0)
    wandb: bool = arg(False, "Also log to Weights & Biases (offline unless WANDB_API_KEY is set).")
    wandb_project: str = arg("dalle-repro", "wandb project name.")


class MetricsLogger:
    """``log(step, metrics)`` to ``RUN/metrics.jsonl``, the progress bar and (optionally) wandb."""

    def __init__(self, run_dir: str | Path, args: LogArgs, config: Any, total: int, start: int = 0, main: bool = True):
        self.main = main
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, disable=not main or None)
        self.total = total
        self.every = args.every
        self.start, self.started = start, time.perf_counter()  # for the plain lines' ETA
        self.plain = main and not sys.stderr.isatty()  # no bar there: plain lines instead
        if not main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run: drop what the interrupted run logged after its checkpoint
            rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        if args.wandb:
            self._wandb = _start_wandb(run_dir, args.wandb_project, to_dict(config))

    def log(self, step: int, metrics: dict[str, Any], show: tuple[str, ...] = ()) -> None:
        if not self.main:
            return
        row = {"step": step} | {k: _plain(v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if show:
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in show if isinstance(row.get(k), (int, float))})
        if self.plain:
            keys = [k for k in (*show, "img_per_s", "tok_per_s") if k in row] or [k for k in row if k != "step"][:6]
            values = " ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys)
            print(f"step {step}/{self.total} {values}{self._eta(step)}", file=sys.stderr, flush=True)
        if self._wandb is not None:
            try:
                self._wandb.log(row, step=step)
            except Exception as e:  # never let logging end a run
                log.warning("wandb failed (%s); switching it off", e)
                self._wandb = None

    def _eta(self, step: int) -> str:
        """`` eta=MM:SS`` from this process's pace so far (what the bar shows on a terminal)."""
        done = step - self.start
        if done <= 0 or step >= self.total:
            return ""
        left = int((time.perf_counter() - self.started) / done * (self.total - step))
        return f" eta={left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:
                pass


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _start_wandb(run_dir: str | Path, project: str, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning("log.wandb is on but wandb is not installed; logging to metrics.jsonl only")
        return None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    try:
        return wandb.init(project=project, dir=str(run_dir), config=config, mode=mode)
    except Exception as e:
        log.warning("wandb could not start (%s); logging to metrics.jsonl only", e)
        return None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN/metrics.jsonl``. The file is appended to as a run goes, so a run killed
    mid-write leaves a torn last line: it is dropped (with a warning). A bad line before the last
    is damage of another kind, and raises ValueError naming the file and the line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if n == len(lines) - 1:
                log.warning("%s: line %d is torn (a run stopped while writing it); dropped", path, i)
                break
            raise ValueError(f"{path}: line {i} is not JSON ({e})") from e
    return rows


def last_validation(run_dir: str | Path, key: str) -> dict[str, Any]:
    """The last metrics row of a run that holds ``key`` (a validation row), or {}; for a run resumed
    after its last step, whose loop logs nothing new."""
    rows = [r for r in read_metrics(run_dir) if key in r] if Path(run_dir, "metrics.jsonl").is_file() else []
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
