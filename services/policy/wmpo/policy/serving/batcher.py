"""Server-side micro-batching: concurrent Act requests for the same version share one forward pass.

Requests wait at most `max_wait_s` for a batch to fill up to `max_batch`; one worker thread runs the
batches. A full queue is refused at once (the caller answers RESOURCE_EXHAUSTED) rather than growing
without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from wmpo.common.logs import get_logger
from wmpo.common.metrics import histogram

log = get_logger(__name__)
BATCH_SIZE = histogram("policy_batch_size", "Requests per forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
QUEUE_SECONDS = histogram("policy_queue_seconds", "Time a request waited for its batch.")


class QueueFullError(Exception):
    """The batching queue is full."""


@dataclass
class WorkItem:
    """One request waiting for a forward pass; `key` groups items that may share a batch."""

    key: Any
    payload: Any
    future: Future[Any] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Collects `WorkItem`s into batches and hands each batch (same key) to `run_batch`.

    `run_batch(key, payloads)` returns one result per payload; an exception fails the whole batch.
    """

    def __init__(
        self,
        run_batch: Callable[[Any, list[Any]], list[Any]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: queue.Queue[WorkItem | None] = queue.Queue(maxsize=max_queue)
        self._held: list[WorkItem] = []
        self._thread = threading.Thread(target=self._loop, name="policy-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Any, payload: Any) -> tuple[Future[Any], WorkItem]:
        """Queue a request; `QueueFullError` when the queue is full."""
        item = WorkItem(key, payload)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFullError(f"the batching queue is full ({self._queue.maxsize} requests); retry later") from None
        return item.future, item

    def _next(self, timeout: float | None) -> WorkItem | None:
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.max_wait_s
            others: list[WorkItem] = []
            while len(batch) < self.max_batch:
                try:
                    item = self._next(max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                (batch if item.key == first.key else others).append(item)
            self._held = others + self._held
            self._execute(batch)

    def _execute(self, batch: list[WorkItem]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        now = time.perf_counter()
        for item in live:
            QUEUE_SECONDS.observe(now - item.enqueued)
        BATCH_SIZE.observe(len(live))
        try:
            results = self._run_batch(live[0].key, [item.payload for item in live])
        except Exception as exc:
            log.exception("batch failed", size=len(live))
            for item in live:
                item.future.set_exception(exc)
            return
        for item, result in zip(live, results, strict=True):
            item.future.set_result(result)

    def close(self) -> None:
        """Stop the worker after the queued requests are served."""
        self._queue.put(None)
        self._thread.join(timeout=10)
