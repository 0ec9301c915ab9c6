"""Requests that arrive together, sampled together: one worker thread owns the model and batches.

A request is a caption and its sampling settings (or an image edit). The worker takes the first
waiting request, then gathers more for up to ``max_wait`` seconds or until their candidates reach
``max_rows`` sequences, and samples every text request of the batch in one cached
:meth:`~dalle_repro.models.transformer.Transformer.generate_groups` call (each request with its own
settings and seed), decodes the batch with the dVAE in one call, and reranks each request's
candidates against its caption. Image edits run one at a time through :func:`sample.generate`
(each has its own image). The queue is bounded: when ``queue_size`` requests wait, :meth:`submit`
raises :class:`Busy` and the server answers 503 with a retry hint, instead of growing without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from dalle_repro.models.transformer import SampleGroup
from dalle_repro.sample.generate import Box, SampleSettings, generate, pick_distinct

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"the server is busy: {retry_after:.0f} s until a retry may be served")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request: a caption, its settings, and for an edit the image (3, S, S) and a box."""

    caption: str
    settings: SampleSettings
    init_image: torch.Tensor | None = None
    box: Box | None = None
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return self.settings.candidates


@dataclass
class Result:
    """What a request gets back: kept images (3, S, S) in [0, 1], best first, their scores, every
    candidate in generation order with its score, and how many requests shared its generate call."""

    images: list[torch.Tensor]
    scores: list[float] | None
    candidates: torch.Tensor
    candidate_scores: list[float] | None
    batched_with: int
    seconds: float


class Batcher:
    """The worker thread and its bounded queue (see the module docstring)."""

    def __init__(
        self, prior: Any, reranker: Any, max_rows: int = 256, max_wait: float = 0.05, queue_size: int = 32
    ) -> None:
        self.prior, self.reranker = prior, reranker
        self.max_rows, self.max_wait = max_rows, max_wait
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.stats = {"generate_calls": 0, "requests": 0, "largest_batch": 0, "busy": 0}
        self._carry: Job | None = None
        self._stop = threading.Event()
        self._seconds_per_row = 0.05  # a first guess for the retry hint, replaced by measurements
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future resolves to a :class:`Result` (or an exception). Busy when full."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.stats["busy"] += 1
            waiting = sum(j.rows for j in list(self.queue.queue))
            raise Busy(max(1.0, waiting * self._seconds_per_row)) from None
        return job.future

    def close(self) -> None:
        """Stop the worker; requests still waiting get an error instead of waiting forever."""
        self._stop.set()
        self.thread.join(timeout=5)
        if self._carry is not None:
            self._carry.future.set_exception(RuntimeError("the server is shutting down"))
            self._carry = None
        while (job := self._get(0)) is not None:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    def _get(self, timeout: float | None) -> Job | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _next(self, timeout: float | None) -> Job | None:
        """The next job still wanted (a cancelled one, e.g. its client gone, is dropped)."""
        if self._carry is not None:  # already taken (and marked running) by the last batch
            job, self._carry = self._carry, None
            return job
        while True:
            job = self._get(timeout)
            if job is None or job.future.set_running_or_notify_cancel():
                return job

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except Exception:  # never let the worker die silently: every later request would hang
                log.exception("the batcher's worker failed; it goes on with the next requests")

    def _once(self) -> None:
        first = self._next(0.2)
        if first is None:
            return
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_rows and first.init_image is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            job = self._next(left)
            if job is None:
                break
            if job.init_image is not None or rows + job.rows > self.max_rows:
                self._carry = job  # an edit, or too many rows: the next batch starts with it
                break
            batch.append(job)
            rows += job.rows
        self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._edit(batch[0]) if batch[0].init_image is not None else self._sample(batch)
        except Exception as e:  # a bad request's error goes to its caller; the worker keeps serving
            for job in batch:
                job.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        self._seconds_per_row = seconds / max(1, sum(j.rows for j in batch))
        self.stats["generate_calls"] += 1
        self.stats["requests"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        for job, r in zip(batch, results, strict=True):
            r.seconds = seconds
            job.future.set_result(r)

    def _edit(self, job: Job) -> list[Result]:
        p = self.prior
        s = job.settings
        out = generate(p.model, p.dvae, [job.caption], p.tokenizer, s, self.reranker, job.init_image, False, job.box)[0]
        images = list(out.images)
        return [Result(images, out.scores, out.images, out.scores, 1, 0.0)]

    @torch.no_grad()
    def _sample(self, batch: list[Job]) -> list[Result]:
        p = self.prior
        model, dvae, tok = p.model, p.dvae, p.tokenizer
        for job in batch:
            job.settings.check(model)
        dev = next(model.parameters()).device
        text = torch.tensor([tok.encode(j.caption) for j in batch for _ in range(j.rows)], device=dev)
        groups = []
        for j in batch:
            s = j.settings
            gen = torch.Generator(device=dev).manual_seed(s.seed * 1_000_003)  # as sample.generate's caption 0
            groups.append(SampleGroup(s.candidates, s.temperature, s.top_k, s.top_p, s.guidance, gen))
        guided = any(j.settings.guidance != 1.0 for j in batch)
        uncond = torch.tensor([tok.encode("")], device=dev) if guided else None
        tokens = model.generate_groups(text, groups, uncond=uncond)
        g = model.args.grid
        images = torch.cat([dvae.decode(t.view(-1, g, g)) for t in tokens.split(64)]).cpu()
        results, start = [], 0
        for j in batch:
            ims, toks = images[start : start + j.rows], tokens[start : start + j.rows]
            start += j.rows
            scores = self.reranker.scores(ims, j.caption) if self.reranker is not None else None
            ranked = list(range(j.rows)) if scores is None else torch.argsort(scores, descending=True, stable=True)
            kept, _ = pick_distinct([int(i) for i in ranked], toks, j.settings.keep, j.settings.dedup)
            kept_scores = None if scores is None else [float(scores[i]) for i in kept]
            all_scores = None if scores is None else [float(v) for v in scores]
            results.append(Result([ims[i] for i in kept], kept_scores, ims, all_scores, len(batch), 0.0))
        return results
