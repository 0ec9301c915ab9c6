"""The reliability suite's ledger: every test records the faults it injected, how many the system
survived, and how many samples were lost. The totals are printed at the end of the run (and written
to the JSON file named by ``RELIABILITY_REPORT``, when set).

A fault is *survived* when the run (or tool) continued through it and the test's checks of the
result held. A test that fails records nothing past its failure, so a failing suite shows fewer
survivals than injections.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

import pytest


@dataclass
class Ledger:
    rows: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def injected(self, kind: str, n: int = 1) -> None:
        self.rows[kind]["injected"] += n

    def survived(self, kind: str, n: int = 1) -> None:
        self.rows[kind]["survived"] += n

    def lost(self, kind: str, samples: int) -> None:
        self.rows[kind]["samples_lost"] += samples

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for row in self.rows.values():
            for k, v in row.items():
                out[k] += v
        return dict(out)


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER.rows:
        return
    tr = terminalreporter
    tr.section("reliability: faults injected / survived / samples lost")
    width = max(len(k) for k in LEDGER.rows)
    for kind, row in sorted(LEDGER.rows.items()):
        tr.write_line(
            f"{kind:<{width}}  injected {row['injected']:>4}  survived {row['survived']:>4}  "
            f"samples lost {row['samples_lost']:>3}"
        )
    t = LEDGER.totals()
    tr.write_line(
        f"{'total':<{width}}  injected {t.get('injected', 0):>4}  survived {t.get('survived', 0):>4}  "
        f"samples lost {t.get('samples_lost', 0):>3}"
    )
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        report = {"kinds": {k: dict(v) for k, v in LEDGER.rows.items()}, "total": t}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
