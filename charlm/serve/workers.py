"""The worker threads that run the model off the event loop, the bounded line in front of them,
and the threads that read a request's text (its prime) without waiting for a model worker."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from charlm.serve.http import call_soon, Problem
from charlm.serve.limits import ServeLimits

@dataclass
class WorkerPool:
    """Worker threads for the model, with a bounded queue in front of them."""

    limits: ServeLimits
    executor: ThreadPoolExecutor = field(init=False)
    readers: ThreadPoolExecutor = field(init=False)  # tokenizing a request's text: no model, no worker taken
    admitted: int = 0  # requests for the workers, running or waiting (event-loop side)
    admitted_batched: int = 0  # generations for the batcher (--batch), running or waiting
    busy: int = 0  # running (worker side, under the lock)
    batched: int = 0  # generations running in the batcher (its side, under the lock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancels: dict[threading.Event, bool] = field(default_factory=dict)  # → whether batched

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="charlm-model")
        self.readers = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="charlm-read")

    def admit(self, *, batched: bool = False) -> threading.Event:
        """A place for one request (its cancel flag), or 503 when every place is taken: the
        workers and --max-queue waiting for them, or (--batch) N generations in the batch and
        --max-queue waiting for it."""
        running = self.limits.batch if batched else self.limits.workers
        taken = self.admitted_batched if batched else self.admitted
        if taken >= running + self.limits.max_queue:
            what = "generations in the batch" if batched else "running"
            raise Problem(503, f"the server is busy ({running} {what}, {self.limits.max_queue} waiting); "
                                f"try again shortly")
        if batched:
            self.admitted_batched += 1
        else:
            self.admitted += 1
        cancel = threading.Event()
        self.cancels[cancel] = batched
        return cancel

    def release(self, cancel: threading.Event, future: Future | None = None) -> None:
        """The request is over: its work stops at its next check, and its place is free once the
        worker running it (if any) has finished, so no more requests run than were admitted. Work
        that has not started is dropped at once."""
        cancel.set()
        if future is not None and not future.done() and not future.cancel():
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _: call_soon(loop, self.release, cancel))
            return
        batched = self.cancels.pop(cancel, None)
        if batched is True:
            self.admitted_batched -= 1
        elif batched is False:
            self.admitted -= 1

    def waiting(self) -> int:
        return max(0, self.admitted + self.admitted_batched - self.busy - self.batched)

    def submit(self, cancel: threading.Event, work: Callable[[], Any]) -> Future:
        """Run ``work`` on a worker; it runs even when cancelled while it waited, to say so
        (a stream's producer ends its stream; the others stop at their first check)."""
        def run() -> Any:
            with self.lock:
                self.busy += 1
            try:
                return work()
            finally:
                with self.lock:
                    self.busy -= 1

        return self.executor.submit(run)

    def read(self, work: Callable[[], Any]) -> Future:
        """Run ``work`` (reading a request's text, no model) on a reader thread: it never waits
        behind a generation for a worker, so a stream's answer starts at once and a bad prime is
        a 422 however busy the workers are."""
        return self.readers.submit(work)

    def stop_all(self) -> None:
        """End every generation at its next token (the server is shutting down)."""
        for cancel in list(self.cancels):
            cancel.set()

    def close(self) -> None:
        self.stop_all()  # what is queued still runs, and ends at once
        self.executor.shutdown(wait=False)
        self.readers.shutdown(wait=False)
