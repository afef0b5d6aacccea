"""Rollout workers: imagined frames/s through the services (policy server + Triton dream/reward) for one
worker running 1 episode at a time vs the same worker running N at once (batched across episodes).

    .venv/bin/python bench/bench_rollout.py [--image-size 32] [--episodes 32] [--concurrency 16] [--horizon 48]

Starts a real local stack (Redis, Triton, policy server) with tiny random-weight models in a temporary
registry; speed does not depend on the weights. The reward threshold is 1.0, so every episode runs its horizon.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wmpo.common.registry import Registry
from wmpo.policy.actions import ActionCodec
from wmpo.policy.checkpoint import PolicyBundle, save_policy
from wmpo.policy.model import VLAPolicy, make_config
from wmpo.policy.tokenizer import build_byte_tokenizer
from wmpo.robot import AsyncPolicyClient
from wmpo.stack.settings import StackSettings
from wmpo.stack.stack import Stack
from wmpo.trainer.rollout.episodes import EpisodeJob
from wmpo.trainer.rollout.queue import JobQueue
from wmpo.trainer.rollout.worker import POLICY_OPTIONS, RolloutWorker
from wmpo.worldmodel.checkpoint import save_world_model
from wmpo.worldmodel.model import make_world_model
from wmpo.worldmodel.reward.checkpoint import save_reward_model
from wmpo.worldmodel.reward.model import RewardModel
from wmpo.worldmodel.serving.client import AsyncWorldModelClient


def build_registry(root: Path, size: int) -> Path:
    registry = root / "registry"
    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    model = VLAPolicy(make_config("tiny", vocab_size=len(tokenizer), proprio_dim=0, image_size=size))
    save_policy(PolicyBundle(model, tokenizer, ActionCodec.identity(4, 0)), root / "policy")
    Registry(registry, "policy").publish(root / "policy")
    save_world_model(make_world_model("tiny", image_size=size), root / "wm", {"steps": 0})
    Registry(registry, "worldmodel").publish(root / "wm")
    save_reward_model(RewardModel.create("tiny", size, 8), root / "reward")
    Registry(registry, "reward").publish(root / "reward")
    return registry


def frames_per_second(stack: Stack, concurrency: int, episodes: int, horizon: int, size: int, tag: str) -> float:
    queue = JobQueue(stack.redis_url, f"bench-{tag}")
    queue.purge()
    start = np.random.default_rng(0).integers(0, 255, (4, size, size, 3), dtype=np.uint8)
    jobs = [EpisodeJob(f"{tag}/{i}", "bench", 0, i, 0, 1, "reach the goal", start, seed=i, horizon=horizon,
                       success_threshold=1.0) for i in range(episodes)]  # fmt: skip
    queue.enqueue_many([(j.job_id, j.to_bytes()) for j in jobs])

    async def run() -> float:
        policy = AsyncPolicyClient(stack.policy_address, POLICY_OPTIONS)
        dream = AsyncWorldModelClient(stack.dream_address)
        worker = RolloutWorker(queue, policy, dream, name=tag, concurrency=concurrency)
        began = time.perf_counter()
        stats = await worker.run(max_jobs=episodes)
        elapsed = time.perf_counter() - began
        await policy.close()
        await dream.close()
        assert stats.completed == episodes, stats
        return stats.frames / elapsed

    fps = asyncio.run(run())
    queue.purge()
    return fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = StackSettings(
            dir=root / "stack", registry_dir=build_registry(root, args.image_size), runs_dir=root / "runs",
            redis_port=0, triton_grpc_port=0, triton_http_port=0, triton_metrics_port=0, policy_port=0,
            policy_metrics_port=0, worker_metrics_port=0, api_port=0, workers=0,
        )  # fmt: skip
        with Stack(settings, services="redis,dream,policy", progress=print) as stack:
            frames_per_second(stack, 4, 4, 16, args.image_size, "warmup")
            one = frames_per_second(stack, 1, max(4, args.episodes // 4), args.horizon, args.image_size, "one")
            many = frames_per_second(stack, args.concurrency, args.episodes, args.horizon, args.image_size, "many")
    print(f"{args.image_size}x{args.image_size}, horizon {args.horizon} frames, 3 denoising steps")
    print(f"1 episode at a time:            {one:7.1f} imagined frames/s")
    print(f"{args.concurrency} episodes at once (1 worker):  {many:7.1f} imagined frames/s  (x{many / one:.2f})")


if __name__ == "__main__":
    main()
