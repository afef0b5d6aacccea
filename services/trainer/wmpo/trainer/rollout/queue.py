"""The trainer's job queue (episodes to roll out) on Redis Streams with one consumer group.

Keys, all under ``wmpo:queue:<name>:``:

- ``jobs``: a stream of the jobs not yet done, fields ``job_id``, ``payload`` and ``prior`` (attempts used by
  earlier entries of the same job). Consumer group ``workers``, created lazily from id 0 (MKSTREAM).
- ``dead``: the dead-letter stream, fields ``job_id``, ``payload``, ``error``, ``attempts``.
- ``dead_ids``: a hash job_id -> its entry id in ``dead`` (waiters and operators look dead jobs up by job id).
- ``results``: a hash job_id -> result bytes, written with HSETNX (the first result wins).

Guarantees:

- At-least-once delivery. An entry leaves ``jobs`` only when completed (result stored, XACK, XDEL in one
  MULTI) or failed (re-added or dead-lettered, then XACK + XDEL, in one Lua script). Entries held by a worker
  that died stay in the group's pending list; `JobQueue.claim` reclaims those idle longer than the visibility
  timeout (XAUTOCLAIM). Workers call `JobQueue.heartbeat` to keep long jobs from being reclaimed.
- Bounded retries. `Job.attempt` counts failures and deliveries to workers that died; a job that would go past
  ``max_attempts`` moves to ``dead`` with its error, and `JobQueue.wait_results` stops waiting for it.
- Idempotent results. A job done twice (a slow worker and the one that reclaimed its job) is stored once and
  `JobQueue.complete` tells which call was first; a job whose result exists is not enqueued again, and an
  entry whose job already has a result is dropped when claimed.
- Bounded length. `JobQueue.enqueue` adds only while ``jobs`` holds fewer than ``max_len`` entries (checked
  and added atomically); otherwise the producer waits, nothing is dropped (`QueueFullError` after a timeout).
  Retries replace their entry; `JobQueue.requeue_dead` (an operator action) may go past the bound.

Metrics (`JobQueue.export_metrics`): gauges ``wmpo_queue_{depth,pending,waiting,oldest_age_seconds,
dead_letters,consumers}{queue}`` (depth = entries not done, pending = delivered and not acked, oldest age =
the lag, from the oldest entry's id and the Redis clock) and the counter ``wmpo_queue_jobs_total{queue,event}``
(events: enqueued, completed, duplicate, failed, reclaimed, dead_lettered; counted by this process).

All methods are thread-safe (redis-py's client has a connection pool); asyncio code calls them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from wmpo.common.metrics import counter, gauge

KEY_PREFIX = "wmpo:queue"
MAX_ERROR_CHARS = 8_000
"""Longer error texts (tracebacks) are cut to this many characters in the dead-letter stream."""
_BACKOFF_S = (0.005, 0.25)  # first and longest wait of a producer on a full queue
_BATCH = 500  # jobs per pipelined round trip in enqueue_many

_JOBS = counter("queue_jobs", "Job events seen by this process.", ["queue", "event"])
_GAUGES = {
    "depth": gauge("queue_depth", "Jobs not yet done (stream length).", ["queue"]),
    "pending": gauge("queue_pending", "Jobs delivered to a worker and not yet acknowledged.", ["queue"]),
    "waiting": gauge("queue_waiting", "Jobs no worker holds (depth - pending).", ["queue"]),
    "oldest_age_s": gauge("queue_oldest_age_seconds", "Age of the oldest job not yet done.", ["queue"]),
    "dead_letters": gauge("queue_dead_letters", "Jobs in the dead-letter stream.", ["queue"]),
    "consumers": gauge("queue_consumers", "Workers seen within the visibility timeout.", ["queue"]),
}

# KEYS: jobs, results. ARGV: job_id, payload, max_len. 1 added, 0 result exists, -1 full.
_ENQUEUE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -1 end
redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[1], 'payload', ARGV[2], 'prior', '0')
return 1
"""
# KEYS: jobs, dead, dead_ids. ARGV: group, entry_id, job_id, payload, error, attempts, mode ('retry' | 'dead').
# -1: the entry was already settled (acked) by someone else; 0 re-added; 1 dead-lettered.
_SETTLE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[7] == 'retry' then
  redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[3], 'payload', ARGV[4], 'prior', ARGV[6])
  return 0
end
local id = redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[3], 'payload', ARGV[4], 'error', ARGV[5],
                      'attempts', ARGV[6])
redis.call('HSET', KEYS[3], ARGV[3], id)
return 1
"""
# KEYS: jobs. ARGV: group, consumer, entry ids. Resets the idle time of the entries `consumer` still holds.
_HEARTBEAT = """
local held = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    held = held + 1
  end
end
return held
"""
# KEYS: dead, dead_ids, jobs. ARGV: job_id. 1 moved back to jobs, 0 no such dead letter.
_REQUEUE_DEAD = """
local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local found = redis.call('XRANGE', KEYS[1], id, id)
if #found == 0 then return 0 end
local fields = found[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'payload' then
    redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1], 'payload', fields[i + 1], 'prior', '0')
  end
end
redis.call('XDEL', KEYS[1], id)
return 1
"""


@dataclass(frozen=True)
class Job:
    """One delivery of a job to a worker."""

    entry_id: str
    """The stream entry id (for `JobQueue.heartbeat`; `complete`/`fail` take the job)."""
    job_id: str
    """The caller's stable id, e.g. ``run-a/it0003/g02/e05``."""
    payload: bytes
    attempt: int
    """1 for the first delivery; counts failures and deliveries to workers that died."""


@dataclass(frozen=True)
class DeadLetter:
    """A job that used up its attempts."""

    job_id: str
    payload: bytes
    error: str
    attempts: int
    entry_id: str


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one queue (the numbers behind the Prometheus gauges)."""

    depth: int
    """Entries not yet done (XLEN of the jobs stream)."""
    pending: int
    """Delivered to a worker and not yet acknowledged."""
    waiting: int
    """depth - pending: entries no worker holds."""
    oldest_age_s: float
    """Age of the oldest entry not yet done (0 when empty): the queue's lag."""
    dead_letters: int
    consumers: int
    """Workers seen (claim or heartbeat) within the visibility timeout."""


class QueueFullError(TimeoutError):
    """`JobQueue.enqueue` waited longer than its timeout for room in the queue."""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: dict[Any, Any]) -> dict[str, bytes]:
    return {_s(k): v for k, v in raw.items()}


class JobQueue:
    """A bounded, at-least-once job queue with retries, dead letters and idempotent results (see the module)."""

    def __init__(
        self,
        redis_url_or_client: str | redis.Redis,
        name: str = "episodes",
        *,
        max_len: int = 10_000,
        visibility_timeout_s: float = 120.0,
        max_attempts: int = 3,
        group: str = "workers",
    ) -> None:
        if not name:
            raise ValueError("queue name must not be empty")
        if max_len < 1 or max_attempts < 1 or visibility_timeout_s <= 0:
            raise ValueError("max_len and max_attempts must be >= 1 and visibility_timeout_s > 0")
        if isinstance(redis_url_or_client, str):
            self.redis = redis.Redis.from_url(redis_url_or_client, decode_responses=False)
            self._owns_client = True
        else:
            if redis_url_or_client.get_connection_kwargs().get("decode_responses"):
                raise ValueError("the Redis client must use decode_responses=False (payloads are bytes)")
            self.redis = redis_url_or_client
            self._owns_client = False
        self.name, self.group = name, group
        self.max_len, self.max_attempts = max_len, max_attempts
        self.visibility_timeout_s = visibility_timeout_s
        prefix = f"{KEY_PREFIX}:{name}"
        self.jobs_key, self.dead_key = f"{prefix}:jobs", f"{prefix}:dead"
        self.dead_ids_key, self.results_key = f"{prefix}:dead_ids", f"{prefix}:results"
        self._enqueue = self.redis.register_script(_ENQUEUE)
        self._settle = self.redis.register_script(_SETTLE)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._requeue_dead = self.redis.register_script(_REQUEUE_DEAD)
        self._group_ready = False
        self._lock = threading.Lock()
        self._reclaim_cursor = "0-0"

    def close(self) -> None:
        """Close the connection pool if this queue created the client from a URL."""
        if self._owns_client:
            self.redis.close()

    # --- producers -------------------------------------------------------------------------------------------

    def enqueue(self, job_id: str, payload: bytes, *, timeout: float | None = None) -> bool:
        """Add a job; False (nothing added) if `job_id` already has a result.

        Waits while the queue holds `max_len` entries; `QueueFullError` after `timeout` s (None: wait forever).
        """
        return self.enqueue_many([(job_id, payload)], timeout=timeout) == 1

    def enqueue_many(self, jobs: Iterable[tuple[str, bytes]], *, timeout: float | None = None) -> int:
        """Add jobs in order (pipelined), waiting for room as `enqueue` does; returns how many were added."""
        todo = list(jobs)
        if any(not job_id for job_id, _payload in todo):
            raise ValueError("job_id must not be empty")
        self._ensure_group()
        deadline = None if timeout is None else time.monotonic() + timeout
        added, delay = 0, _BACKOFF_S[0]
        while todo:
            batch, todo = todo[:_BATCH], todo[_BATCH:]
            pipe = self.redis.pipeline(transaction=False)
            for job_id, payload in batch:
                self._enqueue(keys=[self.jobs_key, self.results_key], args=[job_id, payload, self.max_len], client=pipe)
            outcomes = pipe.execute()
            added += outcomes.count(1)
            self._count("enqueued", outcomes.count(1))
            self._count("duplicate", outcomes.count(0))
            full = [job for job, outcome in zip(batch, outcomes, strict=True) if outcome == -1]
            if not full:
                continue
            todo = full + todo  # keep the order; wait for room
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise QueueFullError(
                    f"queue {self.name!r} stayed full ({self.max_len} jobs) for {timeout} s: "
                    f"{added} added, {len(todo)} not added"
                )
            delay = _BACKOFF_S[0] if outcomes.count(1) else min(delay * 2, _BACKOFF_S[1])
            time.sleep(delay if left is None else min(delay, left))
        return added

    # --- workers ---------------------------------------------------------------------------------------------

    def claim(self, consumer: str, count: int = 1, block_ms: int = 1000) -> list[Job]:
        """Up to `count` jobs for `consumer`: first ones reclaimed from silent workers, then new ones.

        A reclaimed job that would go past `max_attempts` is dead-lettered instead of returned; a job whose
        result already exists is acknowledged and dropped. Blocks up to `block_ms` for new jobs when nothing
        was reclaimed (0: return at once).
        """
        self._ensure_group()
        try:
            return self._claim(consumer, count, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # the queue was purged under us: make the group again
            self._ensure_group()
            return self._claim(consumer, count, block_ms)

    def heartbeat(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of the entries `consumer` still holds, so live long jobs are not reclaimed."""
        if not entry_ids:
            return
        self._ensure_group()
        try:
            self._heartbeat(keys=[self.jobs_key], args=[self.group, consumer, *entry_ids])
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):  # purged: the entries are gone, nothing to keep alive
                raise

    def complete(self, job: Job, result: bytes) -> bool:
        """Store the job's result and acknowledge it; True if this was the job's first result."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(self.results_key, job.job_id, result)
        pipe.xack(self.jobs_key, self.group, job.entry_id)
        pipe.xdel(self.jobs_key, job.entry_id)
        first = bool(pipe.execute()[0])
        self._count("completed" if first else "duplicate")
        return first

    def fail(self, job: Job, error: str) -> bool:
        """Count a failed attempt: retry the job (a new entry, same job_id) or, at `max_attempts`, dead-letter it.

        True if dead-lettered. False also when the entry was already settled by another holder (a worker
        that was thought dead and then completed or failed it): nothing more happens then.
        """
        mode = "dead" if job.attempt >= self.max_attempts else "retry"
        outcome = self._settle_entry(job.entry_id, job.job_id, job.payload, error, job.attempt, mode)
        if outcome >= 0:
            self._count("failed")
        return outcome == 1

    # --- results ---------------------------------------------------------------------------------------------

    def result(self, job_id: str) -> bytes | None:
        """The job's result, or None if it has none yet."""
        value: bytes | None = self.redis.hget(self.results_key, job_id)  # type: ignore[assignment]
        return value

    def results(self, job_ids: Sequence[str]) -> dict[str, bytes]:
        """The results of the finished jobs among `job_ids`."""
        if not job_ids:
            return {}
        values: list[bytes | None] = self.redis.hmget(self.results_key, list(job_ids))  # type: ignore[assignment]
        return {job_id: value for job_id, value in zip(job_ids, values, strict=True) if value is not None}

    def wait_results(
        self,
        job_ids: Sequence[str],
        *,
        timeout: float | None = None,
        poll_s: float = 0.2,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, bytes]:
        """Wait until every job is finished or dead-lettered; the results of the finished ones.

        `on_progress(n)` is called with the number of settled jobs whenever it changes. `TimeoutError`
        after `timeout` s (None: wait forever).
        """
        remaining = list(dict.fromkeys(job_ids))
        total, found, dead = len(remaining), {}, 0
        deadline = None if timeout is None else time.monotonic() + timeout
        reported = -1
        while True:
            if remaining:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hmget(self.results_key, remaining)
                pipe.hmget(self.dead_ids_key, remaining)
                values, dead_ids = pipe.execute()
                still = []
                for job_id, value, dead_id in zip(remaining, values, dead_ids, strict=True):
                    if value is not None:
                        found[job_id] = value
                    elif dead_id is not None:
                        dead += 1
                    else:
                        still.append(job_id)
                remaining = still
            settled = total - len(remaining)
            if on_progress is not None and settled != reported:
                on_progress(settled)
                reported = settled
            if not remaining:
                return found
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"queue {self.name!r}: {len(found)} of {total} jobs finished and {dead} dead-lettered "
                    f"after {timeout} s"
                )
            sleep = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            time.sleep(sleep)

    def forget_results(self, job_ids: Sequence[str]) -> None:
        """Delete stored results (after the learner used them)."""
        if job_ids:
            self.redis.hdel(self.results_key, *job_ids)

    # --- dead letters, stats, admin --------------------------------------------------------------------------

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` dead letters."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(self.dead_key, count=count)  # type: ignore[assignment]
        letters = []
        for entry_id, raw in entries:
            fields = _fields(raw)
            letters.append(
                DeadLetter(
                    job_id=_s(fields["job_id"]),
                    payload=fields["payload"],
                    error=_s(fields["error"]),
                    attempts=int(fields["attempts"]),
                    entry_id=_s(entry_id),
                )
            )
        return letters

    def requeue_dead(self, job_id: str) -> bool:
        """Operator action: put a dead-lettered job back in the queue with its attempts reset; False if none."""
        moved = bool(self._requeue_dead(keys=[self.dead_key, self.dead_ids_key, self.jobs_key], args=[job_id]))
        if moved:
            self._count("enqueued")
        return moved

    def stats(self) -> QueueStats:
        """Depth, pending, waiting, lag, dead letters and live consumers, read from Redis now."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.jobs_key)
        pipe.xlen(self.dead_key)
        pipe.xrange(self.jobs_key, count=1)
        pipe.time()
        pipe.xpending(self.jobs_key, self.group)
        pipe.xinfo_consumers(self.jobs_key, self.group)
        depth, dead, oldest, (seconds, micros), pending_info, consumers = pipe.execute(raise_on_error=False)
        if isinstance(pending_info, redis.ResponseError):  # no group (nothing claimed yet, or purged)
            pending, live = 0, 0
        else:
            pending = int(pending_info["pending"])
            timeout_ms = self.visibility_timeout_s * 1000
            live = sum(1 for consumer in consumers if int(consumer["idle"]) < timeout_ms)
        age = 0.0
        if oldest:
            now_ms = int(seconds) * 1000 + int(micros) / 1000
            age = max(0.0, (now_ms - int(_s(oldest[0][0]).split("-")[0])) / 1000)
        return QueueStats(
            depth=int(depth),
            pending=pending,
            waiting=max(0, int(depth) - pending),
            oldest_age_s=age,
            dead_letters=int(dead),
            consumers=live,
        )

    def export_metrics(self) -> QueueStats:
        """`stats` and set the ``wmpo_queue_*{queue}`` gauges from it (call it on each scrape or periodically)."""
        stats = self.stats()
        for field, metric in _GAUGES.items():
            metric.labels(queue=self.name).set(getattr(stats, field))
        return stats

    def purge(self) -> None:
        """Delete every key of this queue: jobs, consumer group, dead letters, results."""
        self.redis.delete(self.jobs_key, self.dead_key, self.dead_ids_key, self.results_key)
        self._group_ready = False

    # --- internals -------------------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(self.jobs_key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _claim(self, consumer: str, count: int, block_ms: int) -> list[Job]:
        jobs = self._reclaim(consumer, count)
        if len(jobs) < count:
            block = block_ms if block_ms > 0 and not jobs else None
            reply: Any = self.redis.xreadgroup(
                self.group, consumer, {self.jobs_key: ">"}, count=count - len(jobs), block=block
            )  # RESP2: [[key, entries]], RESP3: {key: entries}
            streams = reply.values() if isinstance(reply, dict) else [entries for _key, entries in reply or []]
            fresh = [(entry_id, _fields(raw), 1) for entries in streams for entry_id, raw in entries]
            jobs += self._to_jobs(fresh)
        return jobs

    def _reclaim(self, consumer: str, count: int) -> list[Job]:
        """XAUTOCLAIM entries idle past the visibility timeout; dead-letter those out of attempts."""
        with self._lock:
            cursor = self._reclaim_cursor
        min_idle_ms = int(self.visibility_timeout_s * 1000)
        reply = self.redis.xautoclaim(self.jobs_key, self.group, consumer, min_idle_ms, cursor, count=count)
        with self._lock:
            self._reclaim_cursor = _s(reply[0])
        claimed = [(entry_id, raw) for entry_id, raw in reply[1] if entry_id is not None]
        if not claimed:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _raw in claimed:
            pipe.xpending_range(self.jobs_key, self.group, min=entry_id, max=entry_id, count=1)
        deliveries = [info[0]["times_delivered"] if info else 1 for info in pipe.execute()]
        self._count("reclaimed", len(claimed))
        return self._to_jobs(
            [(entry_id, _fields(raw), n) for (entry_id, raw), n in zip(claimed, deliveries, strict=True)]
        )

    def _to_jobs(self, entries: list[tuple[bytes, dict[str, bytes], int]]) -> list[Job]:
        """Jobs from claimed (entry id, fields, deliveries): entries whose job already has a result are acked
        and dropped; those past `max_attempts` (reclaimed from dead workers) are dead-lettered."""
        if not entries:
            return []
        job_ids = [_s(fields["job_id"]) for _entry_id, fields, _delivered in entries]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hexists(self.results_key, job_id)
        finished = pipe.execute()
        jobs, done = [], []
        for (entry_id, fields, delivered), job_id, has_result in zip(entries, job_ids, finished, strict=True):
            prior = int(fields.get("prior", b"0"))
            if has_result:
                done.append(entry_id)
            elif prior + delivered <= self.max_attempts:
                jobs.append(Job(_s(entry_id), job_id, fields["payload"], attempt=prior + delivered))
            else:
                error = f"delivered {delivered - 1} times; the workers holding it died or timed out"
                error += f" (after {prior} earlier attempts)" if prior else ""
                self._settle_entry(_s(entry_id), job_id, fields["payload"], error, prior + delivered - 1, "dead")
        if done:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(self.jobs_key, self.group, *done)
            pipe.xdel(self.jobs_key, *done)
            pipe.execute()
            self._count("duplicate", len(done))
        return jobs

    def _settle_entry(self, entry_id: str, job_id: str, payload: bytes, error: str, attempts: int, mode: str) -> int:
        outcome = int(
            self._settle(
                keys=[self.jobs_key, self.dead_key, self.dead_ids_key],
                args=[self.group, entry_id, job_id, payload, error[:MAX_ERROR_CHARS], attempts, mode],
            )
        )
        if outcome == 1:
            self._count("dead_lettered")
        return outcome

    def _count(self, event: str, n: int = 1) -> None:
        if n:
            _JOBS.labels(queue=self.name, event=event).inc(n)
