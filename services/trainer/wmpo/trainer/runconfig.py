"""The `run:` section of a run config (RUN.yaml): what one WMPO training run does.

RUN.yaml holds a `trainer:` section (where Redis, the services and the registry are — `TrainerSettings`)
and a `run:` section (the algorithm — this class; defaults are the paper's, see DESIGN.md §3). Values can
also come from env ``WMPO_RUN_*``.

`environment` says where rollouts happen: ``dream`` (the world model imagines the frames, the reward model
judges success; start states come from the dataset) or ``sim`` (the real simulator, its own success signal;
start states are simulator resets at training seeds `sim_seeds`, below `EVAL_SEED_OFFSET`). ``sim`` is
online GRPO, the paper's baseline, through the same queue, workers, policy server and update.

A dream run's groups can also start from simulator resets (`start_states: sim`: the reset frame at a training
seed, rendered by `sim_camera` at the world model's image size); then `audit_fraction` of its episodes are audited:
their actions are replayed open-loop in the simulator from the same seed, and each iteration reports how far
imagination agrees with what really happens (`wmpo.trainer.audit`).

Real episodes — `sim` rollouts, audit replays and alignment rollouts — count against `real_episode_budget`;
evaluation on held-out seeds is measurement, counted apart (`eval_episodes`), not against the budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from wmpo.common.config import ServiceSettings
from wmpo.sim.tasks import EVAL_SEED_OFFSET


class RunConfig(ServiceSettings):
    """One WMPO run: start states, groups, GRPO hyper-parameters, alignment and evaluation schedule."""

    model_config = SettingsConfigDict(env_prefix="WMPO_RUN_")
    section: ClassVar[str] = "run"

    task: str = Field(default="reach", description="Task (instruction, horizon, simulator for alignment/eval).")
    environment: Literal["dream", "sim"] = Field(
        default="dream", description="Where episodes roll out: dream (world + reward model) or sim (the simulator)."
    )
    real_episode_budget: int | None = Field(
        default=None, ge=0, description="Most real episodes (sim rollouts, audits, alignment) the run may use."
    )
    sim_seeds: tuple[int, int] = Field(
        default=(0, EVAL_SEED_OFFSET // 2),
        description="sim, and dream from sim start states: [first, end) of the training reset seeds groups start from.",
    )
    sim_camera: str = Field(
        default="corner", description="MetaWorld camera of sim episodes, sim start states, audits and evaluation."
    )
    # -- dream start states and the imagination audit
    start_states: Literal["dataset", "sim"] = Field(
        default="dataset",
        description="dream: groups start from dataset start states, or from simulator resets at sim_seeds.",
    )
    audit_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="dream from sim start states: share of each iteration's episodes replayed in the simulator "
        "(real episodes, counted against real_episode_budget).",
    )
    dataset: Path = Field(
        default=Path("wmpo-data/data"), description="Real trajectories: dream start states come from here."
    )
    policy: str = Field(default="latest", description="Policy version or alias the run starts from.")
    iterations: int = Field(default=10, ge=1, description="GRPO iterations (each publishes a policy version).")
    groups_per_iteration: int = Field(default=8, ge=1, description="Start states sampled per iteration.")
    group_size: int = Field(default=8, ge=2, description="Episodes per start state (G).")
    horizon: int | None = Field(default=None, ge=1, description="Steps per episode (default: the task's).")
    temperature: float = Field(default=1.6, gt=0, description="Sampling temperature of the rollouts.")
    success_threshold: float = Field(
        default=0.96, gt=0, le=1, description="dream: reward-model probability of success."
    )
    lr: float = Field(default=5e-6, gt=0, description="Learning rate of the GRPO update.")
    clip_low: float = Field(default=0.2, ge=0, lt=1, description="PPO clip ε_low.")
    clip_high: float = Field(default=0.28, ge=0, description="PPO clip ε_high.")
    epochs: int = Field(default=1, ge=1, description="Passes over an iteration's samples.")
    minibatch_size: int = Field(default=128, ge=1, description="Chunks per optimizer step.")
    entropy_coef: float = Field(default=0.0, ge=0, description="Entropy bonus weight (paper: 0).")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient-norm clip.")
    target_kl: float | None = Field(
        default=None,
        gt=0,
        description="Stop an update once approx-KL to the rollout policy passes 1.5x this.",
    )
    keep_low: float = Field(default=0.1, ge=0, le=1, description="Dynamic sampling: lowest group success rate kept.")
    keep_high: float = Field(default=0.9, ge=0, le=1, description="Dynamic sampling: highest group success rate kept.")
    align_every: int = Field(default=0, ge=0, description="Policy-behaviour alignment every M iterations (0: never).")
    align_rollouts: int = Field(default=128, ge=1, description="Real rollouts per alignment.")
    align_temperature: float | None = Field(default=None, ge=0, description="Their temperature (default: temperature).")
    align_world_model_steps: int = Field(default=300, ge=1, description="World-model fine-tuning steps per alignment.")
    align_reward_steps: int = Field(default=200, ge=1, description="Reward-model fine-tuning steps per alignment.")
    eval_every: int = Field(default=0, ge=0, description="Real-simulator evaluation every N iterations (0: never).")
    eval_episodes: int = Field(default=20, ge=1, description="Episodes per evaluation (held-out seeds).")
    sim_workers: int = Field(default=1, ge=1, description="Simulator processes for alignment and evaluation.")
    videos_per_iteration: int = Field(default=2, ge=0, description="Episodes saved as GIFs per iteration.")
    swap_timeout_s: float = Field(default=120.0, gt=0, description="Wait this long for a service to load a version.")
    seed: int = Field(default=0, ge=0, description="Seeds start-state sampling, episode seeds, minibatches.")
    device: str = Field(default="cpu", description="Learner device: cpu, cuda or cuda:N.")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.keep_low > self.keep_high:
            raise ValueError(f"keep_low ({self.keep_low}) must not exceed keep_high ({self.keep_high})")
        first, end = self.sim_seeds
        if not 0 <= first < end <= EVAL_SEED_OFFSET:
            raise ValueError(
                f"sim_seeds [{first}, {end}) must be a non-empty range of training seeds in [0, {EVAL_SEED_OFFSET}) "
                "(seeds from there on are held out for evaluation)"
            )
        if self.environment == "sim" and self.align_every:
            raise ValueError("align_every: alignment fine-tunes the world model, which a sim run does not use")
        if self.audit_fraction and (self.environment != "dream" or self.start_states != "sim"):
            raise ValueError(
                "audit_fraction: only imagined episodes that start from a simulator reset can be replayed in the "
                "simulator; set environment: dream and start_states: sim"
            )
        return self
