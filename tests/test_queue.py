"""The trainer's job queue on a real redis-server: delivery, reclaim, retries, dead letters, backpressure, metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from wmpo.common.net import wait_until
from wmpo.trainer.rollout.queue import Job, JobQueue, QueueFullError

pytestmark = pytest.mark.redis

VIS = 0.3  # visibility timeout (s) where a test waits for a reclaim


MakeQueue = Callable[..., JobQueue]


@pytest.fixture
def make_queue(redis_url: str) -> Iterator[MakeQueue]:
    """``make_queue(**kwargs)``: a JobQueue on the test's Redis, closed after the test."""
    made: list[JobQueue] = []

    def make(**kwargs: Any) -> JobQueue:
        queue = JobQueue(redis_url, **kwargs)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close()


def _claim_one(queue: JobQueue, consumer: str, timeout: float = 5.0) -> Job:
    """Poll `claim` until it returns a job (one reclaimed after the visibility timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if jobs := queue.claim(consumer, block_ms=0):
            [job] = jobs
            return job
        time.sleep(0.02)
    raise AssertionError(f"no job for {consumer} after {timeout} s")


def _holder(queue: JobQueue, entry_id: str) -> str:
    [info] = queue.redis.xpending_range(queue.jobs_key, queue.group, min=entry_id, max=entry_id, count=1)
    consumer = info["consumer"]
    return consumer.decode() if isinstance(consumer, bytes) else str(consumer)


def _events(queue: str, event: str) -> float:
    return REGISTRY.get_sample_value("wmpo_queue_jobs_total", {"queue": queue, "event": event}) or 0.0


def test_round_trip(make_queue: MakeQueue) -> None:
    queue = make_queue(name="rt")
    assert queue.enqueue("run/it0/e0", b"\x00payload\xff")
    [job] = queue.claim("w1", block_ms=0)
    assert (job.job_id, job.payload, job.attempt) == ("run/it0/e0", b"\x00payload\xff", 1)
    assert queue.result(job.job_id) is None
    assert queue.complete(job, b"\x01result")
    assert queue.result("run/it0/e0") == b"\x01result"
    assert queue.results(["run/it0/e0", "missing"]) == {"run/it0/e0": b"\x01result"}
    assert queue.claim("w1", block_ms=0) == []
    stats = queue.stats()
    assert (stats.depth, stats.pending, stats.waiting) == (0, 0, 0)


def test_claim_blocks_until_a_job_arrives(make_queue: MakeQueue) -> None:
    queue = make_queue(name="block")
    queue.claim("w1", block_ms=0)  # makes the group
    timer = threading.Timer(0.2, queue.enqueue, args=("late", b"x"))
    timer.start()
    jobs = queue.claim("w1", block_ms=5000)
    timer.join()
    assert [job.job_id for job in jobs] == ["late"]


def test_two_consumers_never_get_the_same_new_job(make_queue: MakeQueue) -> None:
    queue = make_queue(name="split")
    assert queue.enqueue_many((f"j{i}", b"p") for i in range(40)) == 40

    def drain(consumer: str) -> list[str]:
        taken: list[str] = []
        while jobs := queue.claim(consumer, count=3, block_ms=0):
            taken += [job.job_id for job in jobs]
        return taken

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(drain, ["a", "b"])
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(f"j{i}" for i in range(40))
    assert len(a + b) == 40


def test_job_of_a_silent_worker_is_reclaimed_after_the_visibility_timeout(make_queue: MakeQueue) -> None:
    queue = make_queue(name="reclaim", visibility_timeout_s=1.0)
    queue.enqueue("j", b"p")
    [held] = queue.claim("dead-worker", block_ms=0)
    assert queue.claim("other", block_ms=0) == []  # not before the timeout
    job = _claim_one(queue, "other")
    assert (job.job_id, job.payload, job.entry_id, job.attempt) == ("j", b"p", held.entry_id, 2)
    assert queue.complete(job, b"r")
    assert queue.stats().depth == 0


def test_heartbeat_keeps_a_live_job(make_queue: MakeQueue) -> None:
    queue = make_queue(name="heartbeat", visibility_timeout_s=VIS)
    queue.enqueue("long", b"p")
    [job] = queue.claim("busy", block_ms=0)
    for _ in range(10):  # 1 s, three visibility timeouts
        queue.heartbeat("busy", [job.entry_id])
        assert queue.claim("thief", block_ms=0) == []
        time.sleep(VIS / 3)
    queue.heartbeat("thief", [job.entry_id])  # not its job: does not take it
    assert _holder(queue, job.entry_id) == "busy"
    stolen = _claim_one(queue, "thief")  # heartbeats stopped
    assert stolen.job_id == "long"
    queue.heartbeat("busy", [job.entry_id])  # the old holder's heartbeat does not take it back
    assert _holder(queue, job.entry_id) == "thief"


def test_complete_twice_keeps_the_first_result(make_queue: MakeQueue) -> None:
    queue = make_queue(name="twice", visibility_timeout_s=VIS)
    queue.enqueue("j", b"p")
    [slow] = queue.claim("slow", block_ms=0)
    fast = _claim_one(queue, "fast")
    before = _events("twice", "duplicate")
    assert queue.complete(fast, b"first")
    assert not queue.complete(slow, b"second")
    assert queue.result("j") == b"first"
    assert _events("twice", "duplicate") == before + 1
    assert queue.stats().depth == 0


def test_enqueue_of_a_finished_job_is_skipped(make_queue: MakeQueue) -> None:
    queue = make_queue(name="skip")
    queue.enqueue("done", b"p")
    [job] = queue.claim("w", block_ms=0)
    queue.complete(job, b"r")
    assert not queue.enqueue("done", b"p")
    assert queue.enqueue_many([("done", b"p"), ("new", b"p")]) == 1
    assert [job.job_id for job in queue.claim("w", count=5, block_ms=0)] == ["new"]


def test_entry_of_a_job_finished_meanwhile_is_dropped_at_claim(make_queue: MakeQueue) -> None:
    queue = make_queue(name="dup-entry")
    queue.enqueue("j", b"p")
    queue.enqueue("j", b"p")  # enqueued twice before it finished
    [first] = queue.claim("w", block_ms=0)
    queue.complete(first, b"r")
    assert queue.claim("w", block_ms=0) == []
    assert queue.stats().depth == 0


def test_fail_retries_then_dead_letters(make_queue: MakeQueue) -> None:
    queue = make_queue(name="fail", max_attempts=2)
    queue.enqueue("j", b"p")
    [job] = queue.claim("w", block_ms=0)
    assert not queue.fail(job, "boom 1")
    [retry] = queue.claim("w", block_ms=0)
    assert (retry.job_id, retry.payload, retry.attempt) == ("j", b"p", 2)
    assert retry.entry_id != job.entry_id
    assert not queue.fail(job, "late failure of the old entry")  # already settled: no effect
    assert queue.fail(retry, "boom 2\nTraceback ...")
    assert queue.claim("w", block_ms=0) == []
    [letter] = queue.dead_letters()
    assert (letter.job_id, letter.payload, letter.error, letter.attempts) == ("j", b"p", "boom 2\nTraceback ...", 2)
    stats = queue.stats()
    assert (stats.depth, stats.dead_letters) == (0, 1)


def test_poison_job_whose_workers_die_lands_in_dead_letters(make_queue: MakeQueue) -> None:
    queue = make_queue(name="poison", visibility_timeout_s=VIS, max_attempts=3)
    queue.enqueue("poison", b"p")
    attempts = [queue.claim("w0", block_ms=0)[0].attempt]
    attempts += [_claim_one(queue, f"w{i}").attempt for i in (1, 2)]
    assert attempts == [1, 2, 3]
    # The fourth delivery would pass max_attempts: the reclaim dead-letters it instead of returning it.
    wait_until(lambda: queue.claim("w3", block_ms=0) == [] and bool(queue.dead_letters()), 5.0, "a dead letter")
    [letter] = queue.dead_letters()
    assert (letter.job_id, letter.attempts) == ("poison", 3)
    assert letter.error == "delivered 3 times; the workers holding it died or timed out"
    stats = queue.stats()
    assert (stats.depth, stats.pending, stats.dead_letters) == (0, 0, 1)


def test_bounded_queue_makes_producers_wait_and_drops_nothing(make_queue: MakeQueue) -> None:
    queue = make_queue(name="bounded", max_len=3)
    added: list[int] = []
    producer = threading.Thread(target=lambda: added.append(queue.enqueue_many((f"j{i}", b"p") for i in range(10))))
    producer.start()
    wait_until(lambda: queue.stats().depth == 3, 5.0, "a full queue")
    time.sleep(0.2)
    assert producer.is_alive()
    assert queue.stats().depth == 3  # waiting, not growing
    done: list[str] = []
    while len(done) < 10:
        for job in queue.claim("w", count=2, block_ms=100):
            assert queue.stats().depth <= 3
            queue.complete(job, job.job_id.encode())
            done.append(job.job_id)
    producer.join(5.0)
    assert added == [10]
    assert sorted(done) == sorted(f"j{i}" for i in range(10))
    assert queue.results(done) == {job_id: job_id.encode() for job_id in done}


def test_full_queue_raises_after_the_timeout(make_queue: MakeQueue) -> None:
    queue = make_queue(name="full", max_len=1)
    assert queue.enqueue("a", b"p")
    with pytest.raises(QueueFullError, match="stayed full"):
        queue.enqueue("b", b"p", timeout=0.2)
    with pytest.raises(TimeoutError):
        queue.enqueue_many([("b", b"p"), ("c", b"p")], timeout=0.1)
    assert queue.stats().depth == 1


def test_wait_results_with_dead_letters(make_queue: MakeQueue) -> None:
    queue = make_queue(name="wait", max_attempts=1)
    ids = ["ok1", "ok2", "bad"]
    queue.enqueue_many((job_id, b"p") for job_id in ids)

    def work() -> None:
        for job in queue.claim("w", count=3, block_ms=1000):
            if job.job_id == "bad":
                queue.fail(job, "no luck")
            else:
                queue.complete(job, job.job_id.encode())

    progress: list[int] = []
    worker = threading.Timer(0.1, work)
    worker.start()
    found = queue.wait_results(ids, timeout=10, poll_s=0.02, on_progress=progress.append)
    worker.join()
    assert found == {"ok1": b"ok1", "ok2": b"ok2"}
    assert progress[0] == 0
    assert progress[-1] == 3
    assert progress == sorted(set(progress))


def test_wait_results_times_out(make_queue: MakeQueue) -> None:
    queue = make_queue(name="wait-timeout")
    queue.enqueue_many([("a", b"p"), ("b", b"p")])
    [job] = queue.claim("w", block_ms=0)
    queue.complete(job, b"r")
    with pytest.raises(TimeoutError, match="1 of 2 jobs finished"):
        queue.wait_results(["a", "b"], timeout=0.2, poll_s=0.05)


def test_stats_and_metrics(make_queue: MakeQueue) -> None:
    queue = make_queue(name="metrics", max_attempts=1)
    enqueued = _events("metrics", "enqueued")
    assert queue.stats().oldest_age_s == 0.0
    queue.enqueue_many((f"j{i}", b"p") for i in range(5))
    time.sleep(0.05)
    first, second = queue.claim("w", count=2, block_ms=0)
    queue.fail(first, "bad")  # dead-lettered at once (max_attempts=1)
    stats = queue.export_metrics()
    assert (stats.depth, stats.pending, stats.waiting, stats.dead_letters, stats.consumers) == (4, 1, 3, 1, 1)
    assert stats.oldest_age_s >= 0.05
    sample = REGISTRY.get_sample_value
    labels = {"queue": "metrics"}
    assert sample("wmpo_queue_depth", labels) == 4
    assert sample("wmpo_queue_pending", labels) == 1
    assert sample("wmpo_queue_waiting", labels) == 3
    assert sample("wmpo_queue_dead_letters", labels) == 1
    assert sample("wmpo_queue_consumers", labels) == 1
    assert sample("wmpo_queue_oldest_age_seconds", labels) == stats.oldest_age_s
    assert _events("metrics", "enqueued") == enqueued + 5
    queue.complete(second, b"r")
    assert queue.export_metrics().pending == 0
    assert sample("wmpo_queue_pending", labels) == 0


def test_requeue_dead(make_queue: MakeQueue) -> None:
    queue = make_queue(name="requeue", max_attempts=1)
    queue.enqueue("j", b"p")
    [job] = queue.claim("w", block_ms=0)
    assert queue.fail(job, "transient")
    assert not queue.requeue_dead("unknown")
    assert queue.requeue_dead("j")
    assert queue.dead_letters() == []
    assert not queue.requeue_dead("j")
    [again] = queue.claim("w", block_ms=0)
    assert (again.job_id, again.payload, again.attempt) == ("j", b"p", 1)
    assert queue.complete(again, b"r")
    assert queue.wait_results(["j"], timeout=1) == {"j": b"r"}


def test_forget_results_and_purge(make_queue: MakeQueue, redis_url: str) -> None:
    queue = make_queue(name="purge", max_attempts=1)
    other = make_queue(name="kept")
    other.enqueue("x", b"p")
    queue.enqueue_many((f"j{i}", b"p") for i in range(3))
    a, b, _c = queue.claim("w", count=3, block_ms=0)
    queue.complete(a, b"r")
    queue.fail(b, "bad")
    queue.forget_results([a.job_id])
    assert queue.result(a.job_id) is None
    queue.purge()
    client = redis.Redis.from_url(redis_url)
    assert client.keys("wmpo:queue:purge*") == []
    client.close()
    assert queue.stats().depth == 0
    assert queue.dead_letters() == []
    assert queue.enqueue("j0", b"p")  # usable again, also from another instance that saw the old group
    stale = make_queue(name="purge")
    stale.claim("w", block_ms=0)
    queue.purge()
    stale.enqueue("j1", b"p")
    assert [job.job_id for job in stale.claim("w", block_ms=0)] == ["j1"]
    assert other.stats().depth == 1


def test_rejects_a_client_that_decodes_responses(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=False"):
        JobQueue(client)
    client.close()


def test_enqueue_many_keeps_order_across_batches(make_queue: MakeQueue) -> None:
    queue = make_queue(name="many")
    ids = [f"j{i:04d}" for i in range(1200)]  # more than one pipelined batch
    assert queue.enqueue_many((job_id, job_id.encode()) for job_id in ids) == 1200
    jobs = queue.claim("w", count=1200, block_ms=0)
    assert [job.job_id for job in jobs] == ids
    assert all(job.payload == job.job_id.encode() for job in jobs)
