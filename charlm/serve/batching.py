"""``--batch N``: the server's line in front of batched generation (infer/batched.py). One thread
steps every running request's samples together, up to N rows, so 32 clients cost little more than
one; requests join and leave between steps, and one whose client left is dropped before its next
step, running or waiting. The texts are ``charlm sample``'s but for a larger batch's rounding."""
from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable

import torch

from charlm.api import LanguageModel
from charlm.infer.batched import BatchedGenerations
from charlm.infer.sample import Generation
from charlm.serve.http import END, STOPPED
from charlm.serve.workers import WorkerPool


class Job:
    """One request's generation in the batcher: where its pieces go, and its cancel flag."""

    def __init__(self, run: Generation, put: Callable[[Any], None], cancel: threading.Event) -> None:
        self.run, self.put, self.cancel = run, put, cancel


class Batcher:
    """The thread that runs one ``BatchedGenerations``: it takes requests from any thread
    (``submit``), starts those that fit in the order they came, and tells each request its pieces,
    ``END``, ``STOPPED`` (cancelled, or the server is stopping) or the exception that ended it."""

    def __init__(self, lm: LanguageModel, max_rows: int, pool: WorkerPool) -> None:
        self.pool = pool
        self.batch = BatchedGenerations(lm.model, max_rows=max_rows)
        self.incoming: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[int, Job] = {}  # running, by id of their Generation
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="charlm-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.incoming.put(job)

    def close(self) -> None:
        self.closed = True
        self.incoming.put(None)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self.closed:
                try:
                    self._admit()
                    if self.jobs:
                        self._step()
                except BaseException as exc:  # noqa: BLE001 - every running request is told, the batcher goes on
                    for job in self.jobs.values():
                        job.put(exc)
                    self.batch.clear()
                    self._set_running({})
        for job in [*self.jobs.values(), *self.waiting]:
            job.put(STOPPED)

    def _admit(self) -> None:
        """Take new requests (waiting for one when idle), drop cancelled ones, start what fits."""
        block = not self.jobs and not self.waiting
        while True:
            try:
                job = self.incoming.get(timeout=0.5) if block else self.incoming.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return
            self.waiting.append(job)
            block = False
        for key, job in [(key, job) for key, job in self.jobs.items() if job.cancel.is_set()]:
            job.put(STOPPED)
            self.batch.remove(job.run)
            self._set_running({k: j for k, j in self.jobs.items() if k != key})
        for job in [j for j in self.waiting if j.cancel.is_set()]:  # gone while waiting: no longer in line
            job.put(STOPPED)
            self.waiting.remove(job)
        while self.waiting and self.batch.fits(self.waiting[0].run):
            job = self.waiting.popleft()
            for piece in self.batch.add(job.run):
                job.put(piece)
            if job.run.finished:  # length 0
                job.put(END)
                continue
            self._set_running({**self.jobs, id(job.run): job})

    def _set_running(self, jobs: dict[int, Job]) -> None:
        self.jobs = jobs
        with self.pool.lock:
            self.pool.batched = len(jobs)

    def _step(self) -> None:
        finished = []
        for run, outcome in self.batch.step():
            job = self.jobs[id(run)]
            if isinstance(outcome, Exception):  # e.g. NaN scores: that request fails, the others go on
                job.put(outcome)
                finished.append(id(run))
                continue
            for piece in outcome:
                job.put(piece)
            if run.finished:
                job.put(END)
                finished.append(id(run))
        if finished:
            self._set_running({key: job for key, job in self.jobs.items() if key not in finished})
