"""GRPO for the VLA: group-normalised advantages, dynamic sampling, and the PPO-clip update.

Per the WMPO paper (and DAPO's asymmetric clip): for each start state a group of G episodes is sampled from
the frozen version θ_old; each episode's advantage is (r − mean_group) / (std_group + ε) with the population
std; groups whose success rate lies outside [low, high] carry no signal and are dropped (dynamic
sampling). The loss is the token-level PPO-clip objective with ε_low / ε_high and no KL term:

    L = −mean_tokens min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A),   ρ = exp(log π_θ − log π_θold)

Every action token of every chunk of an episode shares that episode's advantage. Log-probs are under the
sampling temperature, exactly as the policy server reports them, and each chunk is recomputed from the very
inputs the server was sent (frame, proprio, instruction, through the same `PolicyBundle.prepare`), so at the
first minibatch ρ = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from wmpo.common.tensors import Array
from wmpo.policy.checkpoint import PolicyBundle
from wmpo.policy.model import scaled_log_probs
from wmpo.trainer.runconfig import RunConfig

ADVANTAGE_EPS = 1e-6
"""ε in (r − mean) / (std + ε): keeps an all-equal group's advantages at zero."""


@dataclass(frozen=True)
class GRPOConfig:
    """The GRPO hyper-parameters of a run: the same-named `RunConfig` fields (their defaults, the paper's, and
    their validation live there only), taken by `from_run`."""

    lr: float
    clip_low: float
    clip_high: float
    epochs: int
    minibatch_size: int  # chunks (observation + T×A tokens) per optimizer step
    entropy_coef: float
    grad_clip: float
    temperature: float  # the sampling temperature: log-probs are computed under it
    keep_low: float  # dynamic sampling band: kept groups' success rates lie in [keep_low, keep_high]
    keep_high: float
    target_kl: float | None  # stop an iteration's update once approx-KL to θ_old passes 1.5× this (None: never)
    advantage_eps: float = ADVANTAGE_EPS  # not a run setting

    @classmethod
    def from_run(cls, run: RunConfig) -> GRPOConfig:
        """The GRPO part of `run`: every field but `advantage_eps` is read from the run config."""
        return cls(**{f.name: getattr(run, f.name) for f in fields(cls) if f.name in RunConfig.model_fields})

    def optimizer_steps(self, samples: int) -> int:
        """Optimizer steps `grpo_update` takes over `samples` chunks: ⌈samples / minibatch⌉ per epoch."""
        return self.epochs * -(-samples // self.minibatch_size)


def group_advantages(rewards: Sequence[float], eps: float = ADVANTAGE_EPS) -> Array:
    """(r − mean) / (std + eps) within one group, population std (all-equal rewards give zeros)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        raise ValueError("a group needs at least one episode")
    advantages: Array = ((r - r.mean()) / (r.std() + eps)).astype(np.float32)
    return advantages


def keep_group(rewards: Sequence[float], low: float, high: float) -> bool:
    """Dynamic sampling: keep a group whose success rate lies in [low, high] (inclusive)."""
    rate = float(np.mean(np.asarray(rewards, dtype=np.float64) > 0.5))
    return low <= rate <= high


@dataclass(frozen=True)
class ClipStats:
    loss: torch.Tensor  # the (differentiable) clipped surrogate loss
    clip_fraction: float  # share of tokens whose clipped term was the smaller one
    approx_kl: float  # k3 estimator of KL(θ_old ‖ θ): mean((ρ − 1) − log ρ)
    max_abs_log_ratio: float


def clipped_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> ClipStats:
    """Token-level PPO-clip loss; log-probs [B, ...], advantages [B] broadcast over each row's tokens."""
    adv = advantages.reshape(-1, *([1] * (logp_new.dim() - 1))).to(logp_new.dtype)
    log_ratio = logp_new - logp_old.to(logp_new.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = float((clipped < unclipped).float().mean())
        approx_kl = float(((ratio - 1.0) - log_ratio).mean())
        max_abs = float(log_ratio.abs().max()) if log_ratio.numel() else 0.0
    return ClipStats(loss, clip_fraction, approx_kl, max_abs)


@dataclass
class Samples:
    """Chunk-level training samples of the kept groups: what the policy was sent, what it answered, the advantage."""

    observations: Array  # uint8 [N, H, W, C]
    instructions: list[str]  # [N]
    tokens: Array  # int [N, T, A]
    logprobs: Array  # float32 [N, T, A] from the rollouts (θ_old)
    advantages: Array  # float32 [N]
    proprio: Array  # float32 [N, P]: the proprio each chunk was sampled with (P = the policy's proprio dim, may be 0)

    def __len__(self) -> int:
        return len(self.advantages)


@dataclass(frozen=True)
class UpdateStats:
    loss: float
    clip_fraction: float
    approx_kl: float
    entropy: float
    grad_norm: float
    optimizer_steps: int
    samples: int  # chunks trained on
    first_max_abs_log_ratio: float  # at the first minibatch, before any step: 0 up to float noise
    stopped_early: bool = False  # the KL target ended the update before its planned steps


def grpo_update(
    bundle: PolicyBundle,
    optimizer: torch.optim.Optimizer,
    samples: Samples,
    config: GRPOConfig,
    rng: np.random.Generator,
    on_step: Callable[[int, int], None] | None = None,
) -> UpdateStats:
    """`epochs` passes of shuffled minibatches over `samples`, one optimizer step each.

    With `config.target_kl`, the update stops at the first minibatch whose approx-KL to θ_old (measured before
    its step) exceeds 1.5 × the target, so one iteration cannot move the policy arbitrarily far (PPO's early
    stopping); that minibatch takes no step."""
    if len(samples) == 0:
        raise ValueError("no samples to train on")
    if samples.proprio.shape != (len(samples), bundle.proprio_dim):
        raise ValueError(
            f"proprio of shape {samples.proprio.shape} for {len(samples)} samples of a policy whose proprio dim is "
            f"{bundle.proprio_dim}: the update must see the proprio the rollouts were sampled with"
        )
    camera = bundle.camera_names[0]
    device = bundle.device
    total, done = config.optimizer_steps(len(samples)), 0
    sums = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "entropy": 0.0, "grad": 0.0}
    first = float("nan")
    stopped = False
    bundle.model.train()
    for _epoch in range(config.epochs):
        if stopped:
            break
        order = rng.permutation(len(samples))
        for start in range(0, len(order), config.minibatch_size):
            rows = order[start : start + config.minibatch_size]
            inputs = bundle.prepare(
                [{camera: samples.observations[i]} for i in rows],
                [samples.proprio[i] for i in rows],
                [samples.instructions[i] for i in rows],
            )
            tokens = torch.from_numpy(np.asarray(samples.tokens[rows], np.int64)).to(device)
            log_probs = scaled_log_probs(bundle.logits(inputs), config.temperature)
            logp = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
            stats = clipped_loss(
                logp,
                torch.from_numpy(samples.logprobs[rows]).to(device),
                torch.from_numpy(samples.advantages[rows]).to(device),
                config.clip_low,
                config.clip_high,
            )
            if done == 0:
                first = stats.max_abs_log_ratio
            elif config.target_kl is not None and stats.approx_kl > 1.5 * config.target_kl:
                stopped = True
                break
            loss = stats.loss - config.entropy_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad = torch.nn.utils.clip_grad_norm_(bundle.model.parameters(), config.grad_clip)
            optimizer.step()
            done += 1
            sums["loss"] += float(stats.loss.detach())
            sums["clip"] += stats.clip_fraction
            sums["kl"] += stats.approx_kl
            sums["entropy"] += float(entropy.detach())
            sums["grad"] += float(grad)
            if on_step is not None:
                on_step(done, total)
    bundle.model.eval()
    return UpdateStats(
        loss=sums["loss"] / done,
        clip_fraction=sums["clip"] / done,
        approx_kl=sums["kl"] / done,
        entropy=sums["entropy"] / done,
        grad_norm=sums["grad"] / done,
        optimizer_steps=done,
        samples=len(samples),
        first_max_abs_log_ratio=first,
        stopped_early=stopped,
    )
