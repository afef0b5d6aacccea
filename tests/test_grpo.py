"""GRPO pieces against hand-computed values, and the episode message format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_fixtures import make_checkpoint

from wmpo.common.tensors import Array
from wmpo.policy.checkpoint import load_policy
from wmpo.trainer.grpo import GRPOConfig, Samples, clipped_loss, group_advantages, grpo_update, keep_group
from wmpo.trainer.rollout.episodes import NO_FRAMES, EpisodeJob, EpisodeResult, MessageError, pack, unpack
from wmpo.trainer.runconfig import RunConfig


def test_group_advantages_by_hand() -> None:
    # rewards 1,0,0,0: mean 0.25, population std sqrt(0.1875) = 0.4330127
    adv = group_advantages([1, 0, 0, 0], eps=0.0)
    np.testing.assert_allclose(adv, [0.75 / 0.4330127, -0.25 / 0.4330127, -0.25 / 0.4330127, -0.25 / 0.4330127], 1e-6)
    assert abs(float(adv.sum())) < 1e-6
    # two of four: ±1 exactly
    np.testing.assert_allclose(group_advantages([1, 1, 0, 0], eps=0.0), [1, 1, -1, -1], 1e-6)


def test_all_equal_groups_have_zero_advantage_and_are_dropped() -> None:
    for rewards in ([0.0] * 8, [1.0] * 8):
        np.testing.assert_array_equal(group_advantages(rewards), np.zeros(8, np.float32))
        assert not keep_group(rewards, 0.1, 0.9)
    with pytest.raises(ValueError, match="at least one"):
        group_advantages([])


def test_dynamic_sampling_band_is_inclusive() -> None:
    assert keep_group([1] + [0] * 9, 0.1, 0.9)  # exactly 0.1
    assert keep_group([1] * 9 + [0], 0.1, 0.9)  # exactly 0.9
    assert not keep_group([1] + [0] * 10, 0.1, 0.9)  # 1/11 < 0.1
    assert keep_group([0, 0, 0, 1], 0.25, 0.25)


def test_clipped_objective_with_both_epsilons_by_hand() -> None:
    old = torch.zeros(4, 1)
    # ratios 1.5, 1.5, 0.5, 0.5 for advantages +1, -1, +1, -1
    new = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    stats = clipped_loss(new, old, adv, clip_low=0.2, clip_high=0.28)
    # A>0, ρ=1.5: min(1.5, 1.28) = 1.28 (clipped high). A<0, ρ=1.5: min(-1.5, -1.28) = -1.5 (unclipped).
    # A>0, ρ=0.5: min(0.5, 0.8) = 0.5 (unclipped). A<0, ρ=0.5: min(-0.5, -0.8) = -0.8 (clipped low).
    expected = -(1.28 - 1.5 + 0.5 - 0.8) / 4
    assert math.isclose(float(stats.loss), expected, rel_tol=1e-6)
    assert stats.clip_fraction == 0.5
    # k3 KL: mean((ρ-1) - log ρ)
    k3 = np.mean([0.5 - math.log(1.5)] * 2 + [-0.5 - math.log(0.5)] * 2)
    assert math.isclose(stats.approx_kl, k3, rel_tol=1e-6)
    # the gradient flows only through the unclipped terms
    new.requires_grad_(True)
    clipped_loss(new, old, adv, 0.2, 0.28).loss.backward()  # type: ignore[no-untyped-call]
    assert new.grad is not None
    np.testing.assert_allclose(new.grad.flatten().numpy(), [0.0, 1.5 / 4, -0.5 / 4, 0.0], rtol=1e-6)


def test_ratio_one_gives_the_plain_policy_gradient_objective() -> None:
    logp = torch.randn(3, 8, 4)
    adv = torch.tensor([0.5, -1.0, 2.0])
    stats = clipped_loss(logp, logp.clone(), adv, 0.2, 0.28)
    assert math.isclose(float(stats.loss), -float(adv.mean()), rel_tol=1e-6)
    assert stats.clip_fraction == 0.0 and stats.approx_kl == 0.0 and stats.max_abs_log_ratio == 0.0


def test_update_starts_at_ratio_one_and_moves_the_policy(tmp_path: Path) -> None:
    bundle = load_policy(make_checkpoint(tmp_path / "p", proprio_dim=0, image_size=32))
    rng = np.random.default_rng(0)
    n = 6
    observations = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    inputs = bundle.prepare([{"main": o} for o in observations], [np.zeros(0, np.float32)] * n, ["reach the goal"] * n)
    acted = bundle.act(inputs, [1.6] * n, list(range(n)))
    samples = Samples(observations, ["reach the goal"] * n, acted.tokens, acted.logprobs,
                      np.array([1, -1, 1, -1, 1, -1], np.float32), proprio=np.zeros((n, 0), np.float32))  # fmt: skip
    before = [p.detach().clone() for p in bundle.model.parameters()]
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=1e-3, weight_decay=0.0)
    config = GRPOConfig.from_run(RunConfig.load(None, minibatch_size=4, epochs=2))
    assert config.optimizer_steps(n) == 4
    stats = grpo_update(bundle, optimizer, samples, config, rng)
    assert stats.first_max_abs_log_ratio < 1e-4  # learner log-probs of θ_old == the sampler's
    assert stats.optimizer_steps == 4  # 2 epochs x ceil(6/4)
    assert any(not torch.equal(a, b) for a, b in zip(before, bundle.model.parameters(), strict=True))
    with pytest.raises(ValueError, match="no samples"):
        grpo_update(bundle, optimizer, Samples(observations[:0], [], acted.tokens[:0], acted.logprobs[:0],
                                               np.zeros(0, np.float32), np.zeros((0, 0), np.float32)), config,
                    rng)  # fmt: skip


def test_the_update_feeds_the_proprio_the_rollouts_were_sampled_with(tmp_path: Path) -> None:
    """Defect (b): a proprio policy's θ_old log-probs are recomputed from the proprio it was sent (ρ = 1); the
    zeros the update used to feed give other log-probs."""
    bundle = load_policy(make_checkpoint(tmp_path / "p", proprio_dim=4, image_size=32))
    rng = np.random.default_rng(1)
    n = 6
    observations = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    proprio = rng.normal(0.0, 0.5, (n, 4)).astype(np.float32)
    inputs = bundle.prepare([{"main": o} for o in observations], list(proprio), ["reach the goal"] * n)
    acted = bundle.act(inputs, [1.6] * n, list(range(n)))
    config = GRPOConfig.from_run(RunConfig.load(None, minibatch_size=n))
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=0.0)  # θ stays θ_old for each call

    def first_ratio(fed: Array) -> float:
        samples = Samples(observations, ["reach the goal"] * n, acted.tokens, acted.logprobs,
                          np.ones(n, np.float32), proprio=fed)  # fmt: skip
        return grpo_update(bundle, optimizer, samples, config, np.random.default_rng(0)).first_max_abs_log_ratio

    assert first_ratio(proprio) < 1e-5
    assert first_ratio(np.zeros_like(proprio)) > 1e-3  # the old code's input: the test catches it
    with pytest.raises(ValueError, match="proprio of shape"):
        first_ratio(np.zeros((n, 0), np.float32))


def test_a_kl_target_stops_the_update_before_the_policy_moves_too_far(tmp_path: Path) -> None:
    bundle = load_policy(make_checkpoint(tmp_path / "p", proprio_dim=0, image_size=32))
    rng = np.random.default_rng(0)
    n = 8
    observations = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    inputs = bundle.prepare([{"main": o} for o in observations], [np.zeros(0, np.float32)] * n, ["reach the goal"] * n)
    acted = bundle.act(inputs, [1.0] * n, list(range(n)))
    samples = Samples(observations, ["reach the goal"] * n, acted.tokens, acted.logprobs,
                      np.array([1, -1] * (n // 2), np.float32), proprio=np.zeros((n, 0), np.float32))  # fmt: skip
    state = {k: v.clone() for k, v in bundle.model.state_dict().items()}

    def run(target_kl: float | None) -> tuple[int, bool, float]:
        bundle.model.load_state_dict(state)
        optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=3e-3, weight_decay=0.0)
        config = GRPOConfig.from_run(
            RunConfig.load(None, minibatch_size=2, epochs=4, temperature=1.0, target_kl=target_kl)
        )
        stats = grpo_update(bundle, optimizer, samples, config, np.random.default_rng(0))
        with torch.no_grad():
            after = bundle.logprobs(inputs, torch.from_numpy(np.asarray(acted.tokens, np.int64)), 1.0)
        drift = float((torch.from_numpy(acted.logprobs) - after.detach().cpu()).abs().max())
        return stats.optimizer_steps, stats.stopped_early, drift

    full_steps, full_stopped, full_drift = run(None)
    steps, stopped, drift = run(1e-4)
    assert (full_steps, full_stopped) == (16, False)  # 4 epochs x 4 minibatches
    assert stopped and 1 <= steps < full_steps  # the target ended it early
    assert drift < full_drift


def test_grpo_config_is_the_run_configs_grpo_part() -> None:
    run = RunConfig.load(None, lr=1e-4, clip_high=0.3, epochs=3, minibatch_size=16, keep_low=0.2, temperature=1.2)
    config = GRPOConfig.from_run(run)
    assert (config.lr, config.clip_high, config.epochs, config.minibatch_size) == (1e-4, 0.3, 3, 16)
    assert (config.keep_low, config.keep_high, config.temperature) == (0.2, run.keep_high, 1.2)
    assert (config.clip_low, config.entropy_coef, config.grad_clip) == (0.2, 0.0, 1.0), "the paper's defaults"
    assert config.advantage_eps == 1e-6
    assert config.optimizer_steps(33) == 3 * 3  # 3 epochs x ceil(33/16)


def test_jobs_and_results_round_trip_without_pickle() -> None:
    frames = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    job = EpisodeJob("r/it0000/g000/e00", "r", 0, 0, 0, 3, "reach", frames, seed=2**60, horizon=24)
    back = EpisodeJob.from_bytes(job.to_bytes())
    assert back.job_id == job.job_id and back.seed == 2**60 and back.temperature == 1.6
    np.testing.assert_array_equal(back.start_frames, frames)
    result = EpisodeResult(
        job_id="j",
        group=1,
        index=2,
        policy_version=3,
        world_model_version=4,
        success=True,
        length=9,
        observations=frames[:2],
        tokens=np.ones((2, 8, 4), np.int32),
        logprobs=-np.ones((2, 8, 4), np.float32),
        success_probs=np.full(9, 0.5, np.float32),
        frames=frames,
        worker="w",
        attempt=2,
        seconds=1.5,
        timings={"policy_s": 0.1},
    )
    again = EpisodeResult.from_bytes(result.to_bytes())
    assert again.reward == 1.0 and again.timings == {"policy_s": 0.1} and again.frames is not None
    assert (again.attempt, again.seconds, again.worker) == (2, 1.5, "w")
    np.testing.assert_array_equal(again.logprobs, result.logprobs)
    no_frames = EpisodeResult.from_bytes(EpisodeResult(**{**result.__dict__, "frames": None}).to_bytes())
    assert no_frames.frames is None
    assert again.real is False and again.proprio.shape == (2, 0)  # dream: the policy was sent no proprio
    sim = EpisodeResult(**{**result.__dict__, "proprio": np.full((2, 4), 0.25, np.float32), "real": True})
    sim_back = EpisodeResult.from_bytes(sim.to_bytes())
    assert sim_back.real is True
    np.testing.assert_array_equal(sim_back.proprio, sim.proprio)
    # a result written before proprio and real existed still reads: no proprio, not real
    old_fields, old_arrays = unpack(result.to_bytes())
    old_arrays.pop("proprio")
    old_fields.pop("real")
    old = EpisodeResult.from_bytes(pack(old_fields, old_arrays))
    assert old.proprio.shape == (2, 0) and old.real is False
    sim_job = EpisodeJob("r/it0000/g001/e00", "r", 0, 1, 0, 3, "reach", NO_FRAMES, seed=5, horizon=24,
                         environment="sim", task="reach", reset_seed=77, camera="corner2")  # fmt: skip
    sim_job_back = EpisodeJob.from_bytes(sim_job.to_bytes())
    assert (sim_job_back.environment, sim_job_back.task, sim_job_back.reset_seed, sim_job_back.camera) == (
        "sim", "reach", 77, "corner2")  # fmt: skip
    assert sim_job_back.start_frames.shape == (0, 0, 0, 3) and back.environment == "dream"
    fields, arrays = unpack(pack({"a": 1}, {"x": np.array([1.5], np.float64)}))
    assert fields == {"a": 1} and arrays["x"].dtype == np.float64
    for bad in (b"", b"\x05\x00\x00\x00{oops", pack({"a": 1}, {"x": np.zeros(4)})[:-8]):
        with pytest.raises(MessageError):
            unpack(bad)
    with pytest.raises(MessageError, match="not an episode job"):
        EpisodeJob.from_bytes(pack({"job_id": "x"}, {"start_frames": frames}))
