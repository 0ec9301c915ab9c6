"""Load on the sampling server (launch/serve.py): throughput and latency at 1, 4 and 16 concurrent clients.

Starts the server on a free port of the loopback address (nothing else is ever contacted), waits
until it answers, then sends the same captions (shapes-set captions) in rounds:

- one request at a time: the baseline, as a script calling the server in a loop would;
- ``clients`` concurrent clients for each of ``--clients``, each sending requests back to back, so
  that the server's batcher can put the requests that wait together into one generate call.

Every round is bounded: ``--requests`` requests or ``--seconds`` seconds, whichever comes first
(requests already sent are awaited). Reported per round: images per second (candidates drawn,
decoded and reranked), requests per second, p50 and p95 latency, the throughput over the
one-at-a-time round's, and how many requests the server's generate calls served on average
(``/api/stats``). Writes OUT/load.json and prints a Markdown table.

Usage: python bench/serve_load.py --model outputs/demo/prior/export --clip outputs/demo/clip --out OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_repro.core.cli import flag_aliases, parse_cli  # noqa: E402
from dalle_repro.core.config import arg  # noqa: E402
from dalle_repro.core.cpuinfo import describe_cpu  # noqa: E402
from dalle_repro.core.distributed import free_port  # noqa: E402
from dalle_repro.data import shapes  # noqa: E402


@dataclass
class LoadArgs:
    """The load benchmark's settings."""

    model: str = arg("outputs/demo/prior/export", "The export to serve.")
    clip: str | None = arg("outputs/demo/clip", "CLIP folder for reranking; null: none.")
    out: str = arg("bench-out/serve", "Folder for load.json.")
    clients: list[int] = arg(factory=lambda: [1, 4, 16], doc="Concurrent clients of each round.", gt=0)
    requests: int = arg(64, "Requests per round at most.", gt=0)
    seconds: float = arg(120.0, "Seconds per round at most (then the requests in flight are awaited).", gt=0)
    candidates: int = arg(8, "Candidates per request.", gt=0)
    keep: int = arg(2, "Images kept per request.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature.", ge=0)
    guidance: float = arg(2.0, "Classifier-free guidance.", ge=0)
    max_rows: int = arg(256, "The server's --max-rows.", gt=0)
    max_wait_ms: float = arg(50.0, "The server's --max-wait-ms.", ge=0)


def captions(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [shapes.random_scene(rng, False).caption() for _ in range(n)]


def call(url: str, body: dict) -> float:
    req = urllib.request.Request(
        url + "/api/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        json.loads(r.read())
    return time.perf_counter() - t0


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/stats", timeout=30) as r:
        return json.loads(r.read())


def round_(url: str, clients: int, caps: list[str], a: LoadArgs) -> dict:
    """``clients`` threads sending requests back to back until ``a.requests`` or ``a.seconds``."""
    lock = threading.Lock()
    latencies: list[float] = []
    sent = [0]
    errors: list[str] = []
    t0 = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                if sent[0] >= a.requests or time.perf_counter() - t0 > a.seconds:
                    return
                i = sent[0]
                sent[0] += 1
            body = {"caption": caps[i % len(caps)], "candidates": a.candidates, "keep": a.keep}
            body |= {"temperature": a.temperature, "guidance": a.guidance, "seed": i}
            try:
                latency = call(url, body)
            except (urllib.error.URLError, OSError) as e:
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                latencies.append(latency)

    before = stats(url)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = stats(url)
    calls = after["generate_calls"] - before["generate_calls"]
    served = after["requests"] - before["requests"]
    lat = np.array(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[:5],
        "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) * a.candidates / wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "p95_s": round(float(np.percentile(lat, 95)), 3) if len(lat) else None,
        "requests_per_generate_call": round(served / calls, 2) if calls else None,
    }


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(LoadArgs, argv, __doc__ or "", aliases=flag_aliases(LoadArgs))
    if a is None:
        return 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # absolute paths: the server runs from the repository's root, the paths were given from here
    cmd = [sys.executable, "-m", "dalle_repro.cli.serve", "--model", str(Path(a.model).resolve()), "--port", str(port)]
    cmd += ["--max-rows", str(a.max_rows), "--max-wait-ms", str(a.max_wait_ms), "--queue", "256"]
    if a.clip:
        cmd += ["--clip", str(Path(a.clip).resolve())]
    server = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        for _ in range(600):
            try:
                stats(url)
                break
            except (urllib.error.URLError, OSError):
                if server.poll() is not None:
                    print(f"error: the server exited with status {server.returncode}", file=sys.stderr)
                    return 2
                time.sleep(0.5)
        caps = captions(a.requests)
        call(url, {"caption": caps[0], "candidates": a.candidates, "keep": a.keep})  # warm-up
        rows = [round_(url, 1, caps, a) | {"name": "one at a time"}]
        for c in a.clients:
            rows.append(round_(url, c, caps, a) | {"name": f"{c} clients"})
        base = rows[0]["images_per_s"]
        for r in rows:
            r["speedup"] = round(r["images_per_s"] / base, 2) if base else None
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"cpu": describe_cpu(), "args": vars(a), "rows": rows}
    (out / "load.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"CPU: {report['cpu']}")
    print("| round | requests | images/s | x one at a time | p50 latency | p95 latency | requests per generate call |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['name']} | {r['requests']} | {r['images_per_s']} | {r['speedup']} | {r['p50_s']} s | "
            f"{r['p95_s']} s | {r['requests_per_generate_call']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
