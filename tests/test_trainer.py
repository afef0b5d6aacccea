"""WMPO through the services: real Redis, a real Triton dream/reward server, a real policy gRPC server,
real rollout-worker processes, tiny models and a small real-simulator dataset; and online GRPO in the real
simulator (environment sim) through the same queue, workers, policy server and update, without Triton."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from policy_fixtures import make_checkpoint, start_server

from wmpo.common.config import ConfigError
from wmpo.common.net import free_port, wait_until
from wmpo.common.redis_server import RedisServer
from wmpo.common.registry import Registry
from wmpo.common.seeds import step_seed
from wmpo.common.tensors import Array
from wmpo.common.triton import TritonPorts
from wmpo.data.dataset import TrajectoryDataset
from wmpo.policy.checkpoint import load_policy
from wmpo.policy.serving.server import PolicyServer
from wmpo.robot import AsyncPolicyClient
from wmpo.robot.client import PolicyClient
from wmpo.sim.env import MetaWorldEnv
from wmpo.sim.replay import replay_actions
from wmpo.sim.rollout import run_many
from wmpo.sim.sources import SourceSpec
from wmpo.sim.tasks import EVAL_SEED_OFFSET, get_task
from wmpo.trainer.control.dashboard import render_run
from wmpo.trainer.control.runs import RunStore
from wmpo.trainer.grpo import GRPOConfig, Samples, grpo_update
from wmpo.trainer.learner import budget_groups
from wmpo.trainer.rollout.episodes import NO_FRAMES, EpisodeJob, EpisodeResult
from wmpo.trainer.rollout.queue import JobQueue
from wmpo.trainer.rollout.worker import POLICY_OPTIONS, RolloutWorker
from wmpo.trainer.runconfig import RunConfig
from wmpo.worldmodel.checkpoint import save_world_model
from wmpo.worldmodel.model import make_world_model
from wmpo.worldmodel.reward.checkpoint import save_reward_model
from wmpo.worldmodel.reward.model import RewardModel
from wmpo.worldmodel.serving.client import AsyncWorldModelClient, WorldModelClient
from wmpo.worldmodel.serving.triton import serve_models

SIZE = 32
WMPO = [sys.executable, "-m", "wmpo.common.cli"]
pytestmark = [pytest.mark.triton, pytest.mark.redis]


@dataclass
class Services:
    root: Path
    registry: Path
    dataset: Path
    redis_url: str
    policy: PolicyServer
    triton: TritonPorts

    @property
    def policy_address(self) -> str:
        return f"grpc://{self.policy.address}"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Services]:
    """Registry with policy/world-model/reward v1, a dataset of 3 noisy-expert reach episodes, Triton and policy."""
    root = tmp_path_factory.mktemp("wmpo")
    registry, dataset = root / "registry", root / "data"
    list(run_many(get_task("reach"), SourceSpec("expert", noise=0.3), [1, 2, 3], image_size=SIZE, out_dir=dataset,
                  steps_after_success=8))  # fmt: skip
    Registry(registry, "policy").publish(make_checkpoint(root / "policy", proprio_dim=0, image_size=SIZE))
    torch.manual_seed(0)
    save_world_model(make_world_model("tiny", image_size=SIZE), root / "wm", {"steps": 0})
    Registry(registry, "worldmodel").publish(root / "wm")
    save_reward_model(RewardModel.create("tiny", SIZE, 8), root / "reward")
    Registry(registry, "reward").publish(root / "reward")
    ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
    triton, _models, watcher = serve_models(None, None, ports, registry=str(registry), max_batch_size=16,
                                            max_queue_delay_us=5000, bind_address="127.0.0.1")  # fmt: skip
    policy = start_server(registry=str(registry), redis_url=redis_server.url)
    try:
        yield Services(root, registry, dataset, redis_server.url, policy, ports)
    finally:
        policy.stop()
        if watcher is not None:
            watcher.stop()
        triton.stop()


def spawn_worker(services: Services, name: str, queue: str, **env: str) -> subprocess.Popen[bytes]:
    cmd = [*WMPO, "trainer", "worker", "--redis", services.redis_url, "--policy", services.policy_address,
           "--dream", f"127.0.0.1:{services.triton.grpc}", "--concurrency", "8", "--name", name]  # fmt: skip
    environment = {**os.environ, "WMPO_TRAINER_QUEUE_NAME": queue, **env}
    return subprocess.Popen(cmd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


def run_config(services: Services, tmp_path: Path, queue: str = "train", name: str = "run-a", **run: Any) -> Path:
    config = {
        "trainer": {
            "redis_url": services.redis_url, "policy_address": services.policy_address,
            "dream_address": f"127.0.0.1:{services.triton.grpc}", "registry_dir": str(services.registry),
            "runs_dir": str(tmp_path / "runs"), "queue_name": queue,
        },
        "run": {
            "task": "reach", "dataset": str(services.dataset), "iterations": 2, "groups_per_iteration": 2,
            "group_size": 4, "horizon": 16, "keep_low": 0.0, "keep_high": 1.0, "minibatch_size": 8, "lr": 1e-3,
            "videos_per_iteration": 1, "swap_timeout_s": 60, **run,
        },
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_iterations_publish_versions_that_the_policy_server_serves(services: Services, tmp_path: Path) -> None:
    episodes_before = len(TrajectoryDataset(services.dataset))
    config = run_config(services, tmp_path, align_every=1, align_rollouts=2, align_world_model_steps=2,
                        align_reward_steps=2)  # fmt: skip
    worker = spawn_worker(services, "w1", "train")
    try:
        done = subprocess.run([*WMPO, "train", "--config", str(config), "--no-progress"], check=False,
                              capture_output=True, text=True, timeout=420)  # fmt: skip
    finally:
        worker_log = stop(worker)
    assert done.returncode == 0, done.stdout + done.stderr + worker_log
    assert "run run-a: finished after 2/2 iterations, policy version 3" in done.stdout

    run_dir = tmp_path / "runs" / "run-a"
    records = [yaml.safe_load(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert [(r["policy_version"], r["new_policy_version"]) for r in records] == [(1, 2), (2, 3)]
    # the alignment's 2 real rollouts are the run's only real episodes (dream episodes are imagined)
    assert [(r["real_episodes"], r["real_episodes_total"]) for r in records] == [(2, 2), (0, 2)]
    assert json.loads((run_dir / "state.json").read_text())["real_episodes"] == 2
    for r in records:
        assert r["episodes"] == 8 and r["lost_episodes"] == 0 and r["groups"] == 2 and r["kept_group_fraction"] == 1
        assert 0 <= r["imagined_success_rate"] <= 1 and r["frames"] >= 8 and r["episodes_per_s"] > 0
        assert r["first_max_abs_log_ratio"] < 1e-4  # the learner's θ_old log-probs equal the rollouts' (ρ = 1)
        assert (
            r["optimizer_steps"] == -(-r["samples"] // 8)
            and r["loss"] is not None
            and "clip_fraction" in r
            and "entropy" in r
        )
    # alignment after iteration 1 (not after the last): 2 real rollouts appended, both models published and served
    assert records[0]["align_real_rollouts"] == 2 and "align_real_rollouts" not in records[1]
    assert records[0]["align_world_model_version"] == 2 and records[0]["align_reward_version"] == 2
    assert records[1]["world_model_version"] == 2  # the second iteration imagined with the aligned world model
    assert len(TrajectoryDataset(services.dataset)) == episodes_before + 2
    dream = WorldModelClient(f"127.0.0.1:{services.triton.grpc}")
    _frames, served = dream.imagine(np.zeros((4, SIZE, SIZE, 3), np.uint8), np.zeros((8, 4), np.float32), 0)
    dream.close()
    assert served == 2

    status = yaml.safe_load((run_dir / "status.json").read_text())
    assert (status["status"], status["iteration"], status["policy_version"]) == ("finished", 2, 3)
    versions = Registry(services.registry, "policy").list()
    assert [v.metadata.get("run_id") for v in versions] == [None, "run-a", "run-a"]
    assert [v.metadata.get("parent") for v in versions[1:]] == ["1", "2"]
    with PolicyClient(services.policy_address) as client:
        assert client.list_versions().current_version == 3
        chunk = client.act({"main": np.zeros((SIZE, SIZE, 3), np.uint8)}, "reach the goal", temperature=1.0, seed=1)
        assert chunk.policy_version == 3
    assert len(list((run_dir / "videos").glob("it0001-*.gif"))) == 1
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # the same run again: nothing left to do, nothing re-counted or re-published
    again = subprocess.run([*WMPO, "train", "--config", str(config), "--no-progress"], check=False, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "finished after 2/2 iterations, policy version 3 (16 imagined episodes, 2 real episodes)" in again.stdout
    assert len(Registry(services.registry, "policy").list()) == 3


def test_a_learner_killed_mid_iteration_resumes_without_recounting_episodes(services: Services, tmp_path: Path) -> None:
    config = run_config(services, tmp_path, queue="resume", name="run-b", policy="1", group_size=4, horizon=40)
    queue = JobQueue(services.redis_url, "resume")
    queue.purge()
    worker = spawn_worker(services, "w-resume", "resume")
    train = [*WMPO, "train", "--config", str(config), "--no-progress"]
    try:
        learner = subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        second = [f"run-b/it0001/g{g:03d}/e{e:02d}" for g in range(2) for e in range(4)]
        # crash the learner once some (not all) episodes of iteration 2 are finished
        wait_until(lambda: len(queue.results(second)) >= 2 or learner.poll() is not None, timeout=300,
                   what="iteration 2 to be under way", interval=0.02)  # fmt: skip
        learner.kill()
        learner.wait()
        finished_before = set(queue.results(second))
        assert 2 <= len(finished_before) < 8, "the learner finished iteration 2 before the kill"
        status = yaml.safe_load((tmp_path / "runs" / "run-b" / "status.json").read_text())
        assert status["iteration"] == 1
        done = subprocess.run(train, check=False, capture_output=True, text=True, timeout=300)
    finally:
        worker_log = stop(worker)
    assert done.returncode == 0, done.stdout + done.stderr + worker_log
    assert "reusing finished episodes" in done.stdout + done.stderr
    assert "finished after 2/2 iterations" in done.stdout and "(16 imagined episodes, 0 real episodes)" in done.stdout
    lines = (tmp_path / "runs" / "run-b" / "metrics.jsonl").read_text().splitlines()
    assert [yaml.safe_load(line)["iteration"] for line in lines] == [1, 2]
    assert yaml.safe_load(lines[1])["total_episodes"] == 16
    published = [v for v in Registry(services.registry, "policy").list() if v.metadata.get("run_id") == "run-b"]
    assert [v.metadata["iteration"] for v in published] == ["0", "1"]  # one version per iteration, none twice
    queue.purge()


def _job(services: Services, i: int, horizon: int, size: int = SIZE) -> EpisodeJob:
    frames = TrajectoryDataset(services.dataset).context_frames(
        TrajectoryDataset(services.dataset).episodes[0].episode_id, 0
    )
    if size != SIZE:
        frames = np.zeros((4, size, size, 3), np.uint8)
    return EpisodeJob(f"fault/it0000/g000/e{i:02d}", "fault", 0, 0, i, 1, "reach the goal", frames, seed=i,
                      horizon=horizon)  # fmt: skip


def test_a_killed_workers_episodes_are_reclaimed_and_a_poison_job_is_dead_lettered(services: Services) -> None:
    queue = JobQueue(services.redis_url, "fault", visibility_timeout_s=3.0, max_attempts=3)
    queue.purge()
    good = [_job(services, i, horizon=320) for i in range(4)]
    poison = _job(services, 9, horizon=16, size=SIZE // 2)  # frames the world model cannot take
    assert queue.enqueue_many([(j.job_id, j.to_bytes()) for j in [*good, poison]]) == 5
    env = {"WMPO_TRAINER_VISIBILITY_TIMEOUT_S": "3"}
    first = spawn_worker(services, "doomed", "fault", **env)
    second: subprocess.Popen[bytes] | None = None
    try:
        # kill the first worker while it holds the good episodes, none of them finished
        wait_until(lambda: queue.stats().pending >= 4, timeout=120, what="the first worker to claim the jobs")
        time.sleep(1.0)
        assert not queue.results([j.job_id for j in good]), "episodes finished before the kill; lengthen them"
        first.kill()
        first.wait()
        second = spawn_worker(services, "rescuer", "fault", **env)
        raw = queue.wait_results([j.job_id for j in [*good, poison]], timeout=300)
    finally:
        stop(first)
        if second is not None:
            stop(second)
    results = {job_id: EpisodeResult.from_bytes(data) for job_id, data in raw.items()}
    assert set(results) == {j.job_id for j in good}  # none lost, the poison job is not among them
    for result in results.values():
        assert result.worker == "rescuer" and result.attempt == 2  # reclaimed from the dead worker, done once
        assert result.length == 320 or result.success
    stats = queue.stats()
    assert stats.depth == 0 and stats.pending == 0 and stats.dead_letters == 1
    (dead,) = queue.dead_letters()
    assert dead.job_id == poison.job_id and dead.attempts == 3 and "do not match the world model" in dead.error
    assert queue.complete is not None and not queue.enqueue(good[0].job_id, good[0].to_bytes())  # already done
    queue.purge()


def test_a_redis_restart_loses_no_episode(services: Services, tmp_path: Path) -> None:
    """Jobs and results live in Redis with AOF; workers wait out the restart and finish every episode."""
    server = RedisServer(persist=True, data_dir=tmp_path / "redis").start()
    port = server.port
    queue = JobQueue(server.url, "restart", visibility_timeout_s=5.0)
    jobs = [_job(services, i, horizon=160) for i in range(4)]
    queue.enqueue_many([(j.job_id, j.to_bytes()) for j in jobs])
    cmd = [*WMPO, "trainer", "worker", "--redis", server.url, "--policy", services.policy_address,
           "--dream", f"127.0.0.1:{services.triton.grpc}", "--concurrency", "8", "--name", "survivor"]  # fmt: skip
    worker = subprocess.Popen(cmd, env={**os.environ, "WMPO_TRAINER_QUEUE_NAME": "restart"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: queue.stats().pending >= 4, timeout=120, what="the worker to claim the jobs")
        server.stop()  # mid-episode: the worker's next queue call fails until Redis is back
        time.sleep(2.0)
        server = RedisServer(port, persist=True, data_dir=tmp_path / "redis").start()
        raw = queue.wait_results([j.job_id for j in jobs], timeout=300)
        assert worker.poll() is None, "the worker died with Redis"
    finally:
        log = stop(worker)
        server.stop()
    assert set(raw) == {j.job_id for j in jobs}, log
    assert "cannot reach the job queue; retrying" in log


# ------------------------------------------------------------------------------------ the imagination audit


def test_an_audited_dream_episode_carries_the_real_replay_of_its_executed_actions(services: Services) -> None:
    """A dream episode from a simulator reset, audited: its real frames and per-step success are exactly
    `replay_actions` of the actions the policy took (the horizon-cut last chunk's kept ones only) from its seed."""
    reset_seed = 42
    with MetaWorldEnv("reach", image_size=SIZE) as env:
        start = env.reset(reset_seed).image
    job = EpisodeJob("audit/it0000/g000/e00", "audit", 0, 0, 0, 1, get_task("reach").instruction, start[None], seed=5,
                     horizon=12, success_threshold=1.0, task="reach", reset_seed=reset_seed, audit=True)  # fmt: skip
    queue = JobQueue(services.redis_url, "audit-worker")
    queue.purge()
    queue.enqueue(job.job_id, job.to_bytes())

    async def work() -> None:
        world_model = AsyncWorldModelClient(f"127.0.0.1:{services.triton.grpc}")
        try:
            async with AsyncPolicyClient(services.policy_address, POLICY_OPTIONS) as policy:
                worker = RolloutWorker(queue, policy, world_model, name="audit-w", concurrency=1)
                stats = await worker.run(max_jobs=1)
        finally:
            await world_model.close()
        assert stats.completed == 1 and stats.failed == 0, stats

    asyncio.run(work())
    result = EpisodeResult.from_bytes(queue.results([job.job_id])[job.job_id])
    queue.purge()
    assert result.audited and result.real and result.length == 12 and not result.success  # 8 + 4 frames
    with PolicyClient(services.policy_address) as client:
        camera = client.camera(1)
        chunks = [
            client.act({camera: obs}, job.instruction, version=1, temperature=job.temperature,
                       seed=step_seed(job.seed, i)).actions
            for i, obs in enumerate(result.observations)
        ]  # fmt: skip
    replay = replay_actions("reach", reset_seed, np.concatenate(chunks)[: result.length], image_size=SIZE)
    assert result.real_frames is not None and result.frames is not None
    np.testing.assert_array_equal(result.real_frames, replay.frames)
    np.testing.assert_array_equal(result.real_step_success, replay.success)
    assert result.real_success == replay.solved
    assert result.frames.shape == result.real_frames.shape == (13, SIZE, SIZE, 3)
    np.testing.assert_array_equal(result.frames[0], replay.frames[0])  # imagination began at the real reset frame


def test_a_dream_run_from_sim_starts_audits_episodes_within_the_real_episode_budget(
    services: Services, tmp_path: Path
) -> None:
    """`wmpo train` with start_states sim and audit_fraction 0.5 of 2 groups x 2: 2 audits in iteration 1, then only
    the 1 the budget of 3 leaves; audited episodes are counted as real, and the audit metrics are in each record."""
    config = run_config(services, tmp_path, queue="audit", name="run-audit", policy="1", start_states="sim",
                        audit_fraction=0.5, real_episode_budget=3, group_size=2, horizon=12)  # fmt: skip
    worker = spawn_worker(services, "w-audit", "audit")
    try:
        done = subprocess.run([*WMPO, "train", "--config", str(config), "--no-progress"], check=False,
                              capture_output=True, text=True, timeout=420)  # fmt: skip
    finally:
        worker_log = stop(worker)
    assert done.returncode == 0, done.stdout + done.stderr + worker_log
    assert "finished after 2/2 iterations" in done.stdout
    assert "(8 imagined episodes, 3 real episodes of a budget of 3)" in done.stdout
    assert "fewer audits this iteration" in done.stdout + done.stderr

    run_dir = tmp_path / "runs" / "run-audit"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [(r["audit_planned"], r["audit_audited"], r["real_episodes"], r["real_episodes_total"]) for r in records]
    assert counts == [(2, 2, 2, 2), (1, 1, 1, 3)]
    for r in records:
        assert r["environment"] == "dream" and r["episodes"] == 4 and r["lost_episodes"] == 0
        assert 0 <= r["audit_agreement"] <= 1 and r["audit_hallucinated_successes"] >= 0
        assert r["audit_psnr_h1"] > 0 and r["audit_copy_psnr_h8"] > 0 and "audit_reward_recall" in r
    assert json.loads((run_dir / "state.json").read_text())["real_episodes"] == 3
    published = [v for v in Registry(services.registry, "policy").list() if v.metadata.get("run_id") == "run-audit"]
    assert len(published) == 2
    page = render_run(RunStore(tmp_path / "runs").get("run-audit"), records, [])
    assert "Imagination audit" in page and "imagined vs real success" in page and "PSNR (dB) 8 steps ahead" in page


# ------------------------------------------------------------------------------------ online GRPO in the simulator

SIM_POLICY = 1  # version 1 of the sim registry: a policy that takes proprio


@dataclass
class SimServices:
    root: Path
    registry: Path
    redis_url: str
    policy: PolicyServer

    @property
    def policy_address(self) -> str:
        return f"grpc://{self.policy.address}"


@pytest.fixture(scope="module")
def sim_services(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[SimServices]:
    """A registry whose version 1 is a tiny 32px policy that takes proprio, and a policy server: no Triton."""
    root = tmp_path_factory.mktemp("wmpo-sim")
    registry = root / "registry"
    Registry(registry, "policy").publish(make_checkpoint(root / "policy", proprio_dim=4, image_size=SIZE))
    policy = start_server(registry=str(registry), redis_url=redis_server.url)
    try:
        yield SimServices(root, registry, redis_server.url, policy)
    finally:
        policy.stop()


def sim_job(i: int, reset_seed: int, horizon: int, **fields: Any) -> EpisodeJob:
    return EpisodeJob(f"sim/it0000/g000/e{i:02d}", "sim", 0, 0, i, SIM_POLICY, get_task("reach").instruction,
                      NO_FRAMES, seed=1000 + i, horizon=horizon, environment="sim", task="reach",
                      reset_seed=reset_seed, **fields)  # fmt: skip


def roll_out(
    sim: SimServices, queue_name: str, jobs: list[EpisodeJob], concurrency: int = 2
) -> dict[str, EpisodeResult]:
    """Run `jobs` with an in-process rollout worker that has no world model."""
    queue = JobQueue(sim.redis_url, queue_name)
    queue.purge()
    queue.enqueue_many([(j.job_id, j.to_bytes()) for j in jobs])

    async def work() -> None:
        async with AsyncPolicyClient(sim.policy_address, POLICY_OPTIONS) as policy:
            stats = await RolloutWorker(queue, policy, None, name="sim-w", concurrency=concurrency).run(
                max_jobs=len(jobs)
            )
        assert stats.completed == len(jobs) and stats.failed == 0, stats

    asyncio.run(work())
    raw = queue.results([j.job_id for j in jobs])
    queue.purge()
    return {job_id: EpisodeResult.from_bytes(data) for job_id, data in raw.items()}


def test_a_sim_job_rolls_out_in_the_simulator_through_the_policy_server(sim_services: SimServices) -> None:
    jobs = [sim_job(0, reset_seed=11, horizon=20, record_frames=True), sim_job(1, reset_seed=12, horizon=20)]
    results = roll_out(sim_services, "sim-worker", jobs)
    assert set(results) == {j.job_id for j in jobs}
    client = PolicyClient(sim_services.policy_address)
    camera = client.camera(SIM_POLICY)
    env = MetaWorldEnv("reach", image_size=SIZE)
    for job in jobs:
        result = results[job.job_id]
        n = len(result.tokens)
        assert result.real and result.world_model_version == 0 and result.policy_version == SIM_POLICY
        assert result.tokens.shape == result.logprobs.shape == (n, 8, 4) and np.all(result.logprobs <= 0)
        assert result.observations.shape == (n, SIZE, SIZE, 3) and result.proprio.shape == (n, 4)
        assert result.proprio.dtype == np.float32 and result.success_probs.shape == (result.length,)
        assert 1 <= result.length <= 20 and n == math.ceil(result.length / 8)
        # replay: the same seed's reset, the same pinned version and sampling seeds give the same chunks, frames,
        # proprio and outcome — the episode is the simulator's, and its success is the simulator's
        obs, success = env.reset(job.reset_seed or 0), False
        steps: list[float] = []
        for i in range(n):
            np.testing.assert_array_equal(result.observations[i], obs.image)
            np.testing.assert_array_equal(result.proprio[i], obs.proprio)
            chunk = client.act({camera: obs.image}, job.instruction, obs.proprio, version=SIM_POLICY,
                               temperature=job.temperature, seed=step_seed(job.seed, i))  # fmt: skip
            np.testing.assert_array_equal(chunk.token_ids, result.tokens[i])
            for action in chunk.actions[: job.horizon - len(steps)]:
                step = env.step(action)
                obs, success = step.observation, step.success
                steps.append(float(success))
                if success:
                    break
        assert (result.success, result.length) == (success, len(steps))
        np.testing.assert_array_equal(result.success_probs, steps)
    recorded = results[jobs[0].job_id].frames
    assert recorded is not None and recorded.shape == (results[jobs[0].job_id].length + 1, SIZE, SIZE, 3)
    assert results[jobs[1].job_id].frames is None
    env.close()
    client.close()


def test_the_update_on_sim_samples_of_a_proprio_policy_starts_at_ratio_one(
    sim_services: SimServices, tmp_path: Path
) -> None:
    """Defect (b): the update feeds each chunk the real proprio it was sampled with; zeros (the old code) do not
    reproduce the rollouts' log-probs."""
    jobs = [sim_job(i, reset_seed=20 + i, horizon=16) for i in range(2)]
    results = list(roll_out(sim_services, "sim-ratio", jobs, concurrency=1).values())
    samples = Samples(
        np.concatenate([r.observations for r in results]),
        [jobs[0].instruction] * sum(len(r.tokens) for r in results),
        np.concatenate([r.tokens for r in results]),
        np.concatenate([r.logprobs for r in results]),
        np.ones(sum(len(r.tokens) for r in results), np.float32),
        proprio=np.concatenate([r.proprio for r in results]),
    )
    config = GRPOConfig.from_run(RunConfig.load(None, minibatch_size=len(samples), temperature=jobs[0].temperature))
    bundle = load_policy(Registry(sim_services.registry, "policy").verify(SIM_POLICY).path)
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=0.0)  # θ stays θ_old for each call

    def first_ratio(proprio: Array) -> float:
        fed = Samples(**{**samples.__dict__, "proprio": proprio})
        return grpo_update(bundle, optimizer, fed, config, np.random.default_rng(0)).first_max_abs_log_ratio

    assert first_ratio(samples.proprio) < 1e-5
    assert first_ratio(np.zeros_like(samples.proprio)) > 1e-3  # what the update fed before the fix


def sim_run_config(sim: SimServices, tmp_path: Path, queue: str, name: str, **run: Any) -> Path:
    config = {
        "trainer": {
            "redis_url": sim.redis_url, "policy_address": sim.policy_address,
            "dream_address": f"127.0.0.1:{free_port()}", "registry_dir": str(sim.registry),
            "runs_dir": str(tmp_path / "runs"), "queue_name": queue,
        },
        "run": {
            "task": "reach", "environment": "sim", "policy": str(SIM_POLICY), "iterations": 3,
            "groups_per_iteration": 2, "group_size": 2, "horizon": 24, "keep_low": 0.0, "keep_high": 1.0,
            "minibatch_size": 4, "lr": 1e-3, "videos_per_iteration": 1, "swap_timeout_s": 60, **run,
        },
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def spawn_sim_worker(sim: SimServices, name: str, queue: str) -> subprocess.Popen[bytes]:
    """`wmpo trainer worker` with Redis and the policy only: its --dream address has nothing listening."""
    cmd = [*WMPO, "trainer", "worker", "--redis", sim.redis_url, "--policy", sim.policy_address,
           "--dream", f"127.0.0.1:{free_port()}", "--concurrency", "2", "--name", name]  # fmt: skip
    env = {**os.environ, "WMPO_TRAINER_QUEUE_NAME": queue, "WMPO_TRAINER_VISIBILITY_TIMEOUT_S": "3"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_online_grpo_in_the_simulator_counts_each_real_episode_once_within_its_budget(
    sim_services: SimServices, tmp_path: Path
) -> None:
    """3 planned iterations of 2 groups x 2 real episodes under a budget of 6: the first runs 4 (2 of them reclaimed
    from a worker killed mid-episode, each counted once), the second is shrunk to 1 group (2), the third does not
    fit."""
    config = sim_run_config(sim_services, tmp_path, "sim-train", "sim-a", real_episode_budget=6)
    queue = JobQueue(sim_services.redis_url, "sim-train")
    queue.purge()
    doomed = spawn_sim_worker(sim_services, "doomed", "sim-train")
    rescuer: subprocess.Popen[bytes] | None = None
    first = [f"sim-a/it0000/g{g:03d}/e{e:02d}" for g in range(2) for e in range(2)]
    learner = subprocess.Popen([*WMPO, "train", "--config", str(config), "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_until(lambda: queue.stats().pending >= 2 or learner.poll() is not None, timeout=120, interval=0.02,
                   what="the first worker to claim 2 of iteration 1's episodes")  # fmt: skip
        assert not queue.results(first), "episodes finished before the kill"
        doomed.kill()
        doomed.wait()
        rescuer = spawn_sim_worker(sim_services, "rescuer", "sim-train")
        out, _ = learner.communicate(timeout=300)
    finally:
        if learner.poll() is None:
            learner.kill()
        doomed_log = stop(doomed)
        rescuer_log = stop(rescuer) if rescuer is not None else ""
    assert learner.returncode == 0, out + rescuer_log
    assert "run sim-a: finished after 2/3 iterations, policy version 3 (6 sim episodes, 6 real episodes of a " \
           "budget of 6)" in out  # fmt: skip
    assert "real-episode budget spent: the run ends here" in out
    assert "the world model is not reachable" in rescuer_log + doomed_log  # no Triton, and no need for one

    run_dir = tmp_path / "runs" / "sim-a"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["groups"], r["episodes"], r["real_episodes"], r["real_episodes_total"]) for r in records] == [
        (2, 4, 4, 4), (1, 2, 2, 6)]  # fmt: skip
    assert records[0]["retried_episodes"] == 2 and records[1]["retried_episodes"] == 0  # reclaimed, counted once
    for r in records:
        assert r["environment"] == "sim" and 0 <= r["sim_success_rate"] <= 1 and r["lost_episodes"] == 0
        assert r["first_max_abs_log_ratio"] < 1e-5  # a proprio policy, updated on the proprio it was sent
        assert r["world_model_version"] == 0 and "imagined_success_rate" not in r
    state = json.loads((run_dir / "state.json").read_text())
    assert (state["iteration"], state["episodes"], state["real_episodes"], state["eval_episodes"]) == (2, 6, 6, 0)
    status = yaml.safe_load((run_dir / "status.json").read_text())
    assert (status["status"], status["iteration"], status["policy_version"]) == ("finished", 2, 3)
    published = [v for v in Registry(sim_services.registry, "policy").list() if v.metadata.get("run_id") == "sim-a"]
    assert [(v.version, v.metadata["environment"]) for v in published] == [(2, "sim"), (3, "sim")]
    assert len(list((run_dir / "videos").glob("it0001-g00-e00-*.gif"))) == 1
    queue.purge()


def test_run_config_environment_budget_and_training_seeds() -> None:
    assert RunConfig.load(None).environment == "dream" and RunConfig.load(None).real_episode_budget is None
    sim = RunConfig.load(None, environment="sim", real_episode_budget=10)
    assert sim.sim_seeds[1] <= EVAL_SEED_OFFSET  # training seeds never reach the evaluation seeds
    with pytest.raises(ConfigError, match="held out for evaluation"):
        RunConfig.load(None, sim_seeds=(0, EVAL_SEED_OFFSET + 1))
    with pytest.raises(ConfigError, match="alignment fine-tunes the world model"):
        RunConfig.load(None, environment="sim", align_every=1)
    # audits replay imagined episodes from their simulator start state: dream from sim starts only
    assert RunConfig.load(None, start_states="sim", audit_fraction=0.25).audit_fraction == 0.25
    for refused in ({"audit_fraction": 0.25}, {"environment": "sim", "start_states": "sim", "audit_fraction": 0.5}):
        with pytest.raises(ConfigError, match="audit_fraction: only imagined episodes that start from a simulator"):
            RunConfig.load(None, **refused)
    # whole groups within what is left of the budget; no budget: all groups
    assert budget_groups(8, 8, None, 10**9) == 8
    assert [budget_groups(2, 2, 6, used) for used in (0, 4, 5, 6, 7)] == [2, 1, 0, 0, 0]
    assert budget_groups(128, 1, 100, 30) == 70  # an alignment shrunk to the rest
