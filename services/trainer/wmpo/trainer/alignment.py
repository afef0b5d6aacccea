"""Policy-behaviour alignment: real rollouts of the current policy re-align the world and reward models.

N real rollouts of the current version run in the simulator through the policy service, like a robot
(failures included), and are appended to the run's dataset. The world model and the reward model are then
fine-tuned on the grown dataset from their served versions and published (reward first, then world model);
the Triton server, watching the registry, swaps both in, and the learner waits until the world model's
responses carry the new version before the next iteration imagines with it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wmpo.common.logs import get_logger
from wmpo.sim.rollout import run_many
from wmpo.sim.tasks import EVAL_SEED_OFFSET, get_task
from wmpo.trainer.connections import open_registry, policy_source
from wmpo.trainer.progress import advance_to
from wmpo.trainer.runconfig import RunConfig
from wmpo.trainer.settings import TrainerSettings
from wmpo.worldmodel.reward.train import RewardConfig, train_reward
from wmpo.worldmodel.serving.client import WorldModelClient, WorldModelSpec
from wmpo.worldmodel.train import WMTrainConfig, train_world_model

log = get_logger(__name__)
STEPS_AFTER_SUCCESS = 8  # like `wmpo data collect`: success frames for the reward model's positive clips


def alignment_seeds(run_seed: int, alignment: int, count: int) -> list[int]:
    """Training-side simulator seeds, distinct per alignment and below the evaluation range."""
    span = EVAL_SEED_OFFSET // 2
    base = span + (run_seed * 7_919 + alignment * count) % (span - count)
    return list(range(base, base + count))


def align(
    settings: TrainerSettings,
    config: RunConfig,
    run_dir: Path,
    version: int,
    iteration: int,
    spec: WorldModelSpec,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect real rollouts of `version`, fine-tune and publish the world and reward models, wait for Triton."""
    began = time.monotonic()
    task = get_task(config.task)
    out = run_dir / "alignment" / f"it{iteration:04d}"
    temperature = config.temperature if config.align_temperature is None else config.align_temperature
    source = policy_source(settings, version, temperature)
    seeds = alignment_seeds(config.seed, iteration, config.align_rollouts)
    successes = 0
    bar = tqdm(total=len(seeds), desc=f"alignment {iteration}: real rollouts", unit="ep", disable=not progress)
    for rollout in run_many(task, source, seeds, workers=config.sim_workers, image_size=spec.image_size,
                           out_dir=config.dataset, steps_after_success=STEPS_AFTER_SUCCESS):  # fmt: skip
        successes += int(rollout.success)
        bar.update(1)
    bar.close()
    rollout_s = time.monotonic() - began

    rewards, worlds = open_registry(settings, "reward"), open_registry(settings, "worldmodel")
    reward_base, world_base = rewards.verify("latest"), worlds.verify("latest")
    reward_bar = tqdm(total=config.align_reward_steps, desc=f"alignment {iteration}: reward model", unit="step",
                      disable=not progress)  # fmt: skip
    with reward_bar:
        _reward, reward_metrics = train_reward(
            config.dataset,
            out / "reward",
            RewardConfig(steps=config.align_reward_steps, device=config.device, init=reward_base.path,
                         seed=config.seed + iteration),
            on_step=advance_to(reward_bar),
        )  # fmt: skip
    world_bar = tqdm(total=config.align_world_model_steps, desc=f"alignment {iteration}: world model", unit="step",
                     disable=not progress)  # fmt: skip
    with world_bar:
        world = train_world_model(
            config.dataset,
            out / "worldmodel",
            WMTrainConfig(steps=config.align_world_model_steps, device=config.device, seed=config.seed + iteration,
                          eval_every=max(1, config.align_world_model_steps), warmup_steps=0,
                          ema_decay=max(0.9, 1.0 - 10.0 / config.align_world_model_steps)),
            init=Path(world_base.path),
            on_step=advance_to(world_bar),
        )  # fmt: skip
    metadata = {"alignment_of_policy": str(version), "iteration": str(iteration), "real_rollouts": str(len(seeds))}
    reward_info = rewards.publish(out / "reward", metadata={**metadata, "parent": str(reward_base.version)})
    world_info = worlds.publish(world.checkpoint, metadata={**metadata, "parent": str(world_base.version)})
    swap_s = wait_world_model(settings.dream_address, world_info.version, spec, config.swap_timeout_s)
    result = {
        "align_real_success_rate": successes / len(seeds),
        "align_real_rollouts": len(seeds),
        "align_world_model_version": world_info.version,
        "align_reward_version": reward_info.version,
        "align_reward_auroc": float(reward_metrics.get("auroc", float("nan"))),
        "align_s": time.monotonic() - began,
        "align_rollout_s": rollout_s,
        "align_swap_s": swap_s,
    }
    log.info("aligned the world model to the policy", **result)
    return result


def wait_world_model(address: str, version: int, spec: WorldModelSpec, timeout_s: float) -> float:
    """Block until Triton's `dream` answers with world-model `version` (its watcher hot-swaps it)."""
    began = time.monotonic()
    client = WorldModelClient(address, timeout=30)
    context = np.zeros((spec.context_frames, spec.image_size, spec.image_size, spec.channels), np.uint8)
    actions = np.zeros((spec.future_frames, spec.action_dim), np.float32)
    try:
        while True:
            _frames, served = client.imagine(context, actions, seed=0)
            if served == version:
                return time.monotonic() - began
            if time.monotonic() - began > timeout_s:
                raise RuntimeError(
                    f"Triton at {address} still serves world-model version {served}, not {version}, after "
                    f"{timeout_s:.0f} s (is it started with --registry pointing at the same registry?)"
                )
            time.sleep(0.5)
    finally:
        client.close()
