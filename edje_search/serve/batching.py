"""Micro-batching: concurrent requests become one engine call.

Requests are queued as jobs with a key (jobs with the same key can share a call: text
searches with the same ``rerank_k``, image searches). A collector task on the event loop
takes the oldest job, waits at most ``max_wait_ms`` for company while the engine is idle
(only if other requests are on their way: see ``coming``), and hands every queued job of that
key (up to ``max_batch`` queries) to ``run`` in the one engine thread. While a batch runs,
new jobs pile up and leave together in the next call, so throughput grows with load. The
queue is bounded: past ``max_queue`` queued queries :class:`Overloaded` is raised at once
(the server answers 503 with Retry-After) instead of letting latency grow without bound.

``max_batch=1`` with ``max_wait_ms=0`` serves one request per engine call (batching off),
through the same queue and thread, so the two settings compare like with like.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Hashable

from ..errors import IndexGone

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; ``retry_after`` is a hint in whole seconds."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"server busy: {queued} queries already queued; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 32  # queries per engine call
    max_wait_ms: float = 1.0  # how long an idle engine waits for more queries to join
    max_queue: int = 256  # queued queries beyond which requests are refused (503)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be positive, max_wait_ms non-negative")

    @classmethod
    def off(cls, max_queue: int = 256) -> "BatchSettings":
        return cls(max_batch=1, max_wait_ms=0.0, max_queue=max_queue)


@dataclasses.dataclass
class BatchInfo:
    """How a job was served: shared by every job of one engine call."""
    queries: int  # queries in the engine call
    jobs: int  # requests in the engine call
    queue_ms: float  # this job's wait before its call started


@dataclasses.dataclass
class _Job:
    key: Hashable
    payload: Any
    weight: int
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    """Runs ``run(key, payloads) -> results`` (one result per payload) in a single worker thread.

    ``before_batch()`` runs in that thread before each call (the server refreshes the index there).
    """

    def __init__(self, run: Callable[[Hashable, list], list], settings: BatchSettings = BatchSettings(),
                 before_batch: Callable[[], None] | None = None, coming: Callable[[], int] | None = None):
        self._run = run
        self.settings = settings
        # requests already in the server but not yet queued here: with none, nobody can join a
        # batch within max_wait_ms, so an idle engine starts at once instead of waiting for nothing
        self._coming = coming
        self._before_batch = before_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_weight = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._seconds_per_query = 0.01  # running estimate, for Retry-After
        self.running = 0  # queries of the engine call under way (or waiting for the engine thread)
        self.running_jobs = 0  # requests in that call
        self.batches = 0
        self.queries = 0

    @property
    def queued(self) -> int:
        """Queries waiting for the engine."""
        return self._queued_weight

    @property
    def queued_jobs(self) -> int:
        """Requests waiting for the engine."""
        return len(self._queue)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edje-engine")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="edje-micro-batcher")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("server shutting down"))
        self._queued_weight = 0
        self._executor.shutdown(wait=True)
        self._executor = None

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the engine thread (after ``before_batch``), outside any batch."""
        if self._executor is None:
            raise RuntimeError("the batcher is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._guarded, fn)

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        self._refresh()
        return fn()

    async def submit(self, key: Hashable, payload: Any, weight: int = 1) -> tuple[Any, BatchInfo]:
        """Queue one job of ``weight`` queries and wait for its result."""
        if self._task is None:
            raise RuntimeError("the batcher is not started")
        if self._queued_weight + weight > self.settings.max_queue and self._queued_weight > 0:
            backlog = self._queued_weight + weight
            raise Overloaded(self._queued_weight, max(1, math.ceil(backlog * self._seconds_per_query)))
        loop = asyncio.get_running_loop()
        job = _Job(key, payload, weight, loop.create_future(), time.perf_counter())
        self._queue.append(job)
        self._queued_weight += weight
        self._arrived.set()
        return await job.future

    # ------------------------------------------------------------------------------ internals
    def _refresh(self) -> None:
        if self._before_batch is not None:
            try:
                self._before_batch()
            except IndexGone:
                raise  # the index itself is gone: nothing of it may be served (the request gets 503)
            except Exception:  # noqa: BLE001 - a failed refresh keeps serving the open generation
                logger.exception("refreshing the index failed; still serving the generation already open")

    def _take(self) -> list[_Job]:
        """The oldest job and the queued jobs of its key, up to max_batch queries, in order."""
        first = self._queue[0]
        taken, kept, weight = [], collections.deque(), 0
        for job in self._queue:
            if job.future.done():  # cancelled by a client that went away
                self._queued_weight -= job.weight
                continue
            if job.key == first.key and (not taken or weight + job.weight <= self.settings.max_batch):
                taken.append(job)
                weight += job.weight
            else:
                kept.append(job)
        self._queue = kept
        self._queued_weight -= weight
        return taken

    def _may_get_company(self) -> bool:
        return self._coming is None or self._coming() > 0

    def _same_key_weight(self, key: Hashable) -> int:
        return sum(j.weight for j in self._queue if j.key == key)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.settings.max_wait_ms / 1000
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self._queue[0]
            deadline = first.enqueued + wait
            while self._same_key_weight(first.key) < self.settings.max_batch and self._may_get_company():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs = self._take()
            if not jobs:
                continue
            started = time.perf_counter()
            n_queries = sum(j.weight for j in jobs)
            self.running, self.running_jobs = n_queries, len(jobs)
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, first.key,
                                                     [j.payload for j in jobs])
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self.running = self.running_jobs = 0
            elapsed = time.perf_counter() - started
            self._seconds_per_query = 0.8 * self._seconds_per_query + 0.2 * elapsed / n_queries
            self.batches += 1
            self.queries += n_queries
            for job, result in zip(jobs, results):
                if not job.future.done():
                    info = BatchInfo(queries=n_queries, jobs=len(jobs), queue_ms=1000 * (started - job.enqueued))
                    job.future.set_result((result, info))

    def _run_batch(self, key: Hashable, payloads: list) -> list:
        self._refresh()
        results = self._run(key, payloads)
        if len(results) != len(payloads):
            raise RuntimeError(f"batch runner returned {len(results)} results for {len(payloads)} jobs")
        return results
