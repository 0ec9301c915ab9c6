"""Training logs: jsonl rows, resume trimming, and wandb that never breaks a run."""

from __future__ import annotations

import builtins
import json

import pytest

from dalle_repro.train.metrics import LogArgs, MetricsLogger, read_metrics


def test_rows_and_non_finite_values(tmp_path):
    m = MetricsLogger(tmp_path, LogArgs(), {"a": 1}, total=10)
    m.log(1, {"loss": 2.5, "x": float("nan")}, show=("loss",))
    m.log(2, {"loss": 2.0})
    m.close()
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 1, "loss": 2.5, "x": "nan"}, {"step": 2, "loss": 2.0}]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])  # strict JSON, no NaN literal


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    m = MetricsLogger(tmp_path, LogArgs(), {}, total=10)
    for s in range(1, 7):
        m.log(s, {"loss": float(s)})
    m.close()
    again = MetricsLogger(tmp_path, LogArgs(), {}, total=10, start=4)
    again.log(5, {"loss": 50.0})
    again.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
    ]


def test_other_ranks_write_nothing(tmp_path):
    m = MetricsLogger(tmp_path, LogArgs(), {}, total=3, main=False)
    m.log(1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_without_an_account(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    m = MetricsLogger(tmp_path, LogArgs(wandb=True), {"model": {"depth": 2}}, total=2)
    m.log(1, {"loss": 1.0})
    m.close()
    assert read_metrics(tmp_path)[0]["loss"] == 1.0
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb should have written an offline run"


def test_missing_wandb_never_breaks_a_run(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    m = MetricsLogger(tmp_path, LogArgs(wandb=True), {}, total=2)
    m.log(1, {"loss": 1.0})
    m.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_a_torn_last_line_is_dropped_and_resume_goes_on(tmp_path):
    """A run killed mid-append leaves half a JSON line; resuming used to raise JSONDecodeError."""
    m = MetricsLogger(tmp_path, LogArgs(), {}, total=10)
    for s in range(1, 4):
        m.log(s, {"loss": float(s)})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    again = MetricsLogger(tmp_path, LogArgs(), {}, total=10, start=3)
    again.log(4, {"loss": 4.0})
    again.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_damage_before_the_last_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)


def test_plain_lines_where_stderr_is_no_terminal(tmp_path, capsys):
    """In a cluster's log file the bar is off, and train_dvae used to print nothing until its end."""
    m = MetricsLogger(tmp_path, LogArgs(), {}, total=10)
    m.log(2, {"loss": 1.25, "img_per_s": 300.0}, show=("loss",))
    m.log(2, {"val_psnr": 18.5})
    m.close()
    err = capsys.readouterr().err
    assert "step 2/10 loss=1.25 img_per_s=300" in err and "val_psnr=18.5" in err
