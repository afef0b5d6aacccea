"""The WMPO learner/orchestrator: one process per run (`wmpo train --config RUN.yaml`).

Each iteration it picks start states, enqueues a group of G episodes per start state (pinned to the current
policy version), gathers the results from the rollout workers, keeps the groups whose success rate lies in
[keep_low, keep_high], runs the GRPO update and publishes the new version, then waits until the policy server
serves it. The run's `environment` says where episodes roll out: ``dream`` — start states from the real
dataset (or, with `start_states: sim`, simulator resets at training seeds, rendered here), imagined by the world
model — or ``sim`` — simulator resets at training seeds, real episodes (online GRPO); nothing else differs.
Every `align_every` iterations (dream only) it re-aligns the world and reward models with real rollouts of the
current version (`wmpo.trainer.alignment`).

The imagination audit (dream from sim start states, `audit_fraction` > 0): a share of each iteration's episodes,
chosen from the run seed, is flagged `audit`; the worker replays each one's executed actions in the simulator
from its reset seed, and the iteration's record gets `wmpo.trainer.audit.summarize` of them (``audit_*``:
imagined-vs-real success agreement, hallucinated successes, the reward model's precision/recall on the policy's
own rollouts, PSNR/SSIM by horizon against the real frames and against copy-last-frame).

Real episodes. Every real episode the run consumes is counted once in `RunState.real_episodes` (state.json)
and per iteration in the metrics (`real_episodes`, `real_episodes_total`): a sim episode or an audit replay
when its result is committed with its iteration (a result reused after a crash, or produced by a second worker
after a reclaim, is one result: counted once; an episode lost with a killed worker or dead-lettered gave no data
and is not counted), an alignment rollout when the alignment starts (reserved before it runs, so a crash never lets it
go uncounted). Evaluation on held-out seeds is measurement, not training data: counted apart
(`eval_episodes`), not against the budget. With `real_episode_budget` the budget is never exceeded: a sim
iteration that would exceed it runs fewer groups (whole groups of G), and when not one group fits the run
ends, status finished, with a log line saying so; a dream iteration audits fewer episodes (or none: imagined
training goes on); an alignment is shrunk to what is left, or skipped.

Crash safety: job ids are ``<run>/it<i>/g<g>/e<e>``, so a restarted learner re-enqueues only unfinished
episodes and reuses finished results (the queue keeps them until the iteration is committed); a version
published just before a crash is found in the registry by its (run, iteration) metadata and adopted rather
than trained again. The state that survives is `<run>/state.json` (+ the optimizer state).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_write_text
from wmpo.common.logs import get_logger
from wmpo.common.media import write_gif
from wmpo.common.metrics import gauge
from wmpo.common.registry import VersionNotFoundError
from wmpo.common.tensors import Array
from wmpo.common.training_state import load_tensors, save_tensors
from wmpo.data.dataset import TrajectoryDataset
from wmpo.policy.checkpoint import PolicyBundle, load_policy, save_policy
from wmpo.robot.client import PolicyClient, PolicyClientError
from wmpo.sim.env import ACTION_DIM, PROPRIO_DIM, MetaWorldEnv
from wmpo.sim.tasks import get_task
from wmpo.trainer.audit import AuditRecord, summarize
from wmpo.trainer.connections import make_queue, open_registry, policy_source, policy_token
from wmpo.trainer.control.runs import RunStore
from wmpo.trainer.grpo import GRPOConfig, Samples, UpdateStats, group_advantages, grpo_update, keep_group
from wmpo.trainer.progress import advance_to
from wmpo.trainer.rollout.episodes import NO_FRAMES, EpisodeJob, EpisodeResult
from wmpo.trainer.runconfig import RunConfig
from wmpo.trainer.settings import TrainerSettings
from wmpo.worldmodel.serving.client import WorldModelClient, WorldModelSpec

log = get_logger(__name__)
RUN_GAUGES = (
    "imagined_success_rate",
    "sim_success_rate",
    "audit_agreement",
    "audit_hallucinated_success_rate",
    "real_episodes_total",
    "kept_group_fraction",
    "loss",
    "clip_fraction",
    "approx_kl",
    "entropy",
    "episodes_per_s",
    "frames_per_s",
    "queue_depth",
    "policy_version",
)
_GAUGES = {
    name: gauge(f"trainer_{name}", f"Last iteration's {name.replace('_', ' ')}.", ["run"]) for name in RUN_GAUGES
}
_ITERATION = gauge("trainer_iteration", "Iterations completed by the run.", ["run"])


class StopRequested(Exception):  # noqa: N818 - a control-flow signal, not an error
    """SIGTERM/SIGINT arrived: stop at the next safe point."""


@dataclass
class RunState:
    """What survives a crash: where the run is (`<run>/state.json`)."""

    iteration: int  # iterations completed
    policy_version: int  # the version the next iteration rolls out
    initial_version: int
    episodes: int = 0  # rollout episodes (imagined, or simulated in a sim run) counted (each once)
    frames: int = 0
    alignments: int = 0
    real_episodes: int = 0  # real episodes consumed: sim rollouts + alignment rollouts (the budget's count)
    eval_episodes: int = 0  # real evaluation episodes on held-out seeds (not against the budget)

    @classmethod
    def read(cls, path: Path) -> RunState | None:
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))


def episode_seed(run_seed: int, iteration: int, group: int, index: int) -> int:
    """A stable, well-spread seed per episode (the same after a restart)."""
    return int(np.random.SeedSequence([run_seed, iteration, group, index]).generate_state(1, np.uint64)[0]) >> 2


def budget_groups(groups: int, group_size: int, budget: int | None, used: int) -> int:
    """How many of `groups` groups of `group_size` real episodes fit in what is left of `budget` after `used`
    (all of them without a budget; 0 when not one more group fits)."""
    if budget is None:
        return groups
    return max(0, min(groups, (budget - used) // group_size))


class Learner:
    """Runs one WMPO run to completion (or until stopped), resuming where a previous process left off."""

    def __init__(
        self,
        settings: TrainerSettings,
        config: RunConfig,
        run_id: str,
        config_text: str,
        *,
        progress: bool = True,
    ) -> None:
        self.settings, self.config, self.run_id, self.progress = settings, config, run_id, progress
        self.store = RunStore(settings.runs_dir)
        self.run_dir = self.store.ensure(run_id, config_text).path
        self.state_file = self.run_dir / "state.json"
        self.task = get_task(config.task)
        self.queue = make_queue(settings)
        self.policies = open_registry(settings, "policy")
        self.grpo = GRPOConfig.from_run(config)
        self._stop = False
        self._renderer: MetaWorldEnv | None = None  # renders dream start states from simulator resets

    # -- setup -----------------------------------------------------------------------------------------
    def request_stop(self, *_args: Any) -> None:
        """Stop at the next safe point (between iterations, or while waiting for episodes)."""
        if not self._stop:
            log.info("stop requested: finishing at the next safe point", run=self.run_id)
        self._stop = True

    def _check_stop(self) -> None:
        if self._stop:
            raise StopRequested

    def _dataset(self) -> tuple[TrajectoryDataset, list[tuple[str, int]]]:
        if not self.config.dataset.is_dir():
            raise UserError(f"run.dataset {self.config.dataset} is not a dataset folder")
        dataset = TrajectoryDataset(self.config.dataset)
        if len(dataset) == 0:
            raise UserError(f"run.dataset {self.config.dataset} holds no readable episodes")
        return dataset, dataset.start_states()

    def _world_model_spec(self) -> WorldModelSpec:
        client = WorldModelClient(self.settings.dream_address, timeout=30)
        try:
            return client.spec()
        except Exception as exc:
            raise UserError(f"the world model at {self.settings.dream_address} is not reachable: {exc}") from exc
        finally:
            client.close()

    def _load_policy(self, version: int) -> PolicyBundle:
        try:
            info = self.policies.verify(version)
        except VersionNotFoundError as exc:
            raise UserError(str(exc.args[0])) from exc
        bundle = load_policy(info.path, device=self.config.device)
        if self.config.environment == "dream" and bundle.proprio_dim:
            raise UserError(
                f"policy version {version} takes proprio (dim {bundle.proprio_dim}), which the world model does not "
                "imagine; train the base policy with `wmpo policy train-bc --no-proprio` (or run in environment sim)"
            )
        if self.config.environment == "sim" and (
            bundle.action_dim != ACTION_DIM or bundle.proprio_dim not in (0, PROPRIO_DIM)
        ):
            raise UserError(
                f"policy version {version} acts in {bundle.action_dim}-D with proprio dim {bundle.proprio_dim}; the "
                f"simulator takes {ACTION_DIM}-D actions and gives proprio dim {PROPRIO_DIM}"
            )
        return bundle

    def _reset_frame(self, seed: int, spec: WorldModelSpec) -> Array:
        """The simulator's reset frame at `seed` (uint8 [H, W, C]), at the world model's image size and the run's
        camera. The renderer only ever resets (never steps), so each frame equals a fresh environment's: the
        start frame an audit replay begins from."""
        if self._renderer is None:
            self._renderer = MetaWorldEnv(self.task, image_size=spec.image_size, camera=self.config.sim_camera)
        return self._renderer.reset(seed).image

    def _close_renderer(self) -> None:
        renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.close()

    def _groups(self, state: RunState) -> int:
        """Groups the next iteration runs: all of them, or (sim) the whole groups the real-episode budget allows."""
        cfg = self.config
        if cfg.environment == "dream":
            return cfg.groups_per_iteration
        return budget_groups(cfg.groups_per_iteration, cfg.group_size, cfg.real_episode_budget, state.real_episodes)

    def _state(self) -> RunState:
        state = RunState.read(self.state_file)
        if state is None:
            try:
                version = self.policies.resolve(self.config.policy)
            except VersionNotFoundError as exc:
                raise UserError(f"run.policy: {exc.args[0]}") from exc
            state = RunState(iteration=0, policy_version=version, initial_version=version)
            state.write(self.state_file)
            return state
        log.info("resuming run", run=self.run_id, iteration=state.iteration, policy_version=state.policy_version)
        return self._adopt_published(state)

    def _adopt_published(self, state: RunState) -> RunState:
        """A version this run published for `state.iteration` before a crash is taken, not trained again."""
        for info in reversed(self.policies.list()):
            meta = info.metadata
            if meta.get("run_id") == self.run_id and meta.get("iteration") == str(state.iteration):
                log.info("adopting the version published before the restart", version=info.version)
                state.policy_version, state.iteration = info.version, state.iteration + 1
                state.write(self.state_file)
                break
        return state

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> RunState:
        """Run the remaining iterations; status.json says how it ended (finished, stopped or failed)."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            state = self._state()
            self.store.update(
                self.run_id, status="running", iterations=self.config.iterations, iteration=state.iteration,
                policy_version=state.policy_version, pid=os.getpid(), error=None,
            )  # fmt: skip
            self._loop(state)
            final = "stopped" if self._stop and state.iteration < self.config.iterations else "finished"
            self.store.update(self.run_id, status=final, iteration=state.iteration, policy_version=state.policy_version)
            return state
        except StopRequested:
            self.store.update(self.run_id, status="stopped")
            stopped = RunState.read(self.state_file)
            assert stopped is not None  # written before the first iteration
            return stopped
        except BaseException as exc:
            self.store.update(self.run_id, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self, state: RunState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        dataset: TrajectoryDataset | None = None
        starts: list[tuple[str, int]] = []
        spec: WorldModelSpec | None = None
        if self.config.environment == "dream":
            if self.config.start_states == "dataset":
                dataset, starts = self._dataset()
            spec = self._world_model_spec()
        bundle = self._load_policy(state.policy_version)
        if spec is not None and bundle.image_size != spec.image_size:
            raise UserError(f"the policy sees {bundle.image_size}px images, the world model makes {spec.image_size}px")
        optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=self.grpo.lr, weight_decay=0.0)
        self._load_optimizer(optimizer, state)
        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        client = PolicyClient(self.settings.policy_address, token=policy_token(self.settings), timeout=30)
        try:
            while state.iteration < self.config.iterations:
                self._check_stop()
                if self._groups(state) == 0:
                    log.info(
                        "real-episode budget spent: the run ends here",
                        run=self.run_id,
                        iteration=state.iteration,
                        real_episodes=state.real_episodes,
                        real_episode_budget=self.config.real_episode_budget,
                    )
                    break
                record = self._iteration(state, dataset, starts, spec, bundle, optimizer, client)
                for key, value in record.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        writer.add_scalar(key, value, record["iteration"])
                writer.flush()
        finally:
            writer.close()
            client.close()
            self._close_renderer()

    def _iteration(
        self,
        state: RunState,
        dataset: TrajectoryDataset | None,
        starts: list[tuple[str, int]],
        spec: WorldModelSpec | None,
        bundle: PolicyBundle,
        optimizer: torch.optim.Optimizer,
        client: PolicyClient,
    ) -> dict[str, Any]:
        it, cfg = state.iteration, self.config
        began = time.monotonic()
        planned_groups = self._groups(state)
        if spec is not None:
            jobs = self._dream_jobs(it, state.policy_version, planned_groups, dataset, starts, spec)
        else:
            jobs = self._sim_jobs(it, state.policy_version, planned_groups)
        planned_audits = self._flag_audits(it, jobs, state)
        results = self._gather(it, jobs)
        rollout_s = time.monotonic() - began
        groups: dict[int, list[EpisodeResult]] = defaultdict(list)
        for result in results:
            groups[result.group].append(result)
        band = (self.grpo.keep_low, self.grpo.keep_high)
        kept = {g: rs for g, rs in groups.items() if len(rs) >= 2 and keep_group([r.reward for r in rs], *band)}
        frames, real = int(sum(r.length for r in results)), sum(int(r.real) for r in results)
        record: dict[str, Any] = {
            "iteration": it + 1,
            "environment": cfg.environment,
            "policy_version": state.policy_version,
            self._success_key: float(np.mean([r.success for r in results])) if results else 0.0,
            "groups": planned_groups,
            "kept_groups": len(kept),
            "kept_group_fraction": len(kept) / max(1, planned_groups),
            "episodes": len(results),
            "lost_episodes": len(jobs) - len(results),
            "retried_episodes": sum(int(r.attempt > 1) for r in results),  # reclaimed from a dead worker, or retried
            "real_episodes": real,
            "mean_length": float(np.mean([r.length for r in results])) if results else 0.0,
            "frames": frames,
            "rollout_s": rollout_s,
            "episodes_per_s": len(results) / max(rollout_s, 1e-9),
            "frames_per_s": frames / max(rollout_s, 1e-9),
            "world_model_version": max((r.world_model_version for r in results), default=0),
            "queue_depth": self.queue.export_metrics().depth,
        }
        if cfg.audit_fraction:
            record.update(self._audit_metrics(results, planned_audits))
        self._save_videos(it, results, {job.job_id for job in jobs if job.record_frames})
        update_began = time.monotonic()
        new_version = state.policy_version
        if kept:
            instructions = {job.group: job.instruction for job in jobs}
            stats = self._update(it, bundle, optimizer, kept, instructions)
            record.update({k: v for k, v in asdict(stats).items()})
            new_version = self._publish(it, bundle, optimizer, state, record)
        else:
            log.warning("no group had a success rate within the band: no update this iteration", iteration=it + 1)
            record.update({"loss": None, "clip_fraction": None, "approx_kl": None, "entropy": None})
        record["update_s"] = time.monotonic() - update_began
        record["new_policy_version"] = new_version
        state.iteration, state.policy_version = it + 1, new_version
        state.episodes += len(results)
        state.frames += record["frames"]
        state.real_episodes += real  # committed with the iteration: a reused or reclaimed result counts once
        state.write(self.state_file)
        self.queue.forget_results([job.job_id for job in jobs])
        if new_version != record["policy_version"]:
            record["swap_s"] = self._wait_policy_swap(client, new_version)
        last = state.iteration == cfg.iterations or self._groups(state) == 0
        if spec is not None and cfg.align_every and state.iteration % cfg.align_every == 0 and not last:
            record.update(self._align(state, spec))
            record["real_episodes"] += record["align_real_rollouts"]
        if cfg.eval_every and (state.iteration % cfg.eval_every == 0 or last):
            record.update(self._evaluate(state, bundle.image_size))
        record["total_episodes"], record["time"] = state.episodes, time.time()
        record["real_episodes_total"], record["eval_episodes_total"] = state.real_episodes, state.eval_episodes
        self.store.append_metrics(self.run_id, record)
        self.store.update(self.run_id, iteration=state.iteration, policy_version=state.policy_version)
        _ITERATION.labels(run=self.run_id).set(state.iteration)
        for name in RUN_GAUGES:
            value = record.get(name)
            if isinstance(value, int | float):
                _GAUGES[name].labels(run=self.run_id).set(value)
        log.info(
            "iteration done",
            run=self.run_id,
            **{k: record[k] for k in ("iteration", self._success_key, "kept_groups", "new_policy_version")},
            real_episodes_total=state.real_episodes,
        )
        return record

    @property
    def _success_key(self) -> str:
        """The metric of the rollouts' success rate: imagined_success_rate (dream) or sim_success_rate (sim)."""
        return "imagined_success_rate" if self.config.environment == "dream" else "sim_success_rate"

    # -- pieces ----------------------------------------------------------------------------------------
    def _dream_jobs(
        self,
        it: int,
        version: int,
        groups: int,
        dataset: TrajectoryDataset | None,
        starts: list[tuple[str, int]],
        spec: WorldModelSpec,
    ) -> list[EpisodeJob]:
        """G jobs per group, each group from a start state of the dataset (its last K real frames) or, with
        `start_states: sim`, from the rendered simulator reset of a training seed (one frame: the world model's
        context repeats it, as at the start of an episode)."""
        cfg = self.config
        if dataset is None:
            jobs = []
            for g, reset_seed in enumerate(self._sim_seeds(it)[:groups]):
                frame = self._reset_frame(reset_seed, spec)
                jobs.extend(
                    self._group_jobs(it, version, g, self.task.instruction, f"sim:{self.task.name}@seed{reset_seed}",
                                     start_frames=frame[None], task=self.task.name, reset_seed=reset_seed,
                                     camera=cfg.sim_camera)
                )  # fmt: skip
            return jobs
        rng = np.random.default_rng([cfg.seed, it])
        picks = rng.choice(len(starts), size=cfg.groups_per_iteration, replace=cfg.groups_per_iteration > len(starts))
        infos = {info.episode_id: info for info in dataset.episodes}
        jobs = []
        for g, pick in enumerate(picks[:groups].tolist()):
            episode_id, step = starts[pick]
            frames = dataset.context_frames(episode_id, step, spec.context_frames)
            jobs.extend(
                self._group_jobs(it, version, g, infos[episode_id].instruction, f"{episode_id}@{step}",
                                 start_frames=frames)
            )  # fmt: skip
        return jobs

    def _sim_seeds(self, it: int) -> list[int]:
        """The iteration's training reset seeds, one per planned group (distinct within an iteration when the range
        allows; the same picks however many groups run)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, it])
        first, end = cfg.sim_seeds
        n = cfg.groups_per_iteration
        return [int(s) for s in first + rng.choice(end - first, size=n, replace=n > end - first)]

    def _sim_jobs(self, it: int, version: int, groups: int) -> list[EpisodeJob]:
        """G jobs per group, each group from the simulator reset of a training seed (distinct within an iteration)."""
        cfg = self.config
        jobs = []
        for g, reset_seed in enumerate(self._sim_seeds(it)[:groups]):
            jobs.extend(
                self._group_jobs(it, version, g, self.task.instruction, f"sim:{self.task.name}@seed{reset_seed}",
                                 start_frames=NO_FRAMES, environment="sim", task=self.task.name,
                                 reset_seed=reset_seed, camera=cfg.sim_camera)
            )  # fmt: skip
        return jobs

    def _group_jobs(
        self, it: int, version: int, group: int, instruction: str, source: str, **start: Any
    ) -> list[EpisodeJob]:
        cfg = self.config
        return [
            EpisodeJob(
                job_id=f"{self.run_id}/it{it:04d}/g{group:03d}/e{e:02d}",
                run_id=self.run_id,
                iteration=it,
                group=group,
                index=e,
                policy_version=version,
                instruction=instruction,
                seed=episode_seed(cfg.seed, it, group, e),
                horizon=cfg.horizon or self.task.max_steps,
                temperature=cfg.temperature,
                success_threshold=cfg.success_threshold,
                record_frames=group * cfg.group_size + e < cfg.videos_per_iteration,
                source=source,
                **start,
            )
            for e in range(cfg.group_size)
        ]

    def _flag_audits(self, it: int, jobs: list[EpisodeJob], state: RunState) -> int:
        """Flag `audit_fraction` of the iteration's episodes for an audit (a choice fixed by the run seed and the
        iteration, so a restarted learner flags the same ones), as many as what is left of the real-episode budget
        allows; returns how many were flagged."""
        cfg = self.config
        if not cfg.audit_fraction or not jobs:
            return 0
        wanted = int(np.floor(cfg.audit_fraction * len(jobs) + 0.5))
        allowed = budget_groups(wanted, 1, cfg.real_episode_budget, state.real_episodes)
        if allowed < wanted:
            log.warning("real-episode budget: fewer audits this iteration", iteration=it + 1, audits=allowed,
                        wanted=wanted, real_episodes=state.real_episodes,
                        real_episode_budget=cfg.real_episode_budget)  # fmt: skip
        for i in np.random.default_rng([cfg.seed, it, 2]).permutation(len(jobs))[:allowed].tolist():
            jobs[i].audit = True
        return allowed

    def _audit_metrics(self, results: list[EpisodeResult], planned: int) -> dict[str, Any]:
        """`summarize` of the iteration's audited episodes (``audit_*``), and how many were planned."""
        records = []
        for r in results:
            if not r.audited:
                continue
            try:
                if r.frames is None or r.real_frames is None:
                    raise ValueError("no imagined or no real frames")
                records.append(
                    AuditRecord(imagined_success=r.success, real_success=bool(r.real_success), imagined_frames=r.frames,
                                real_frames=r.real_frames, success_probs=r.success_probs,
                                real_step_success=r.real_step_success)
                )  # fmt: skip
            except ValueError as exc:
                log.warning("an audited episode's result is malformed; left out of the audit", job=r.job_id,
                            error=str(exc))  # fmt: skip
        return {"audit_planned": planned, **summarize(records, self.config.success_threshold)}

    def _gather(self, it: int, jobs: list[EpisodeJob]) -> list[EpisodeResult]:
        ids = [job.job_id for job in jobs]
        added = self.queue.enqueue_many([(job.job_id, job.to_bytes()) for job in jobs])
        if added < len(jobs):
            log.info("reusing finished episodes", iteration=it + 1, finished=len(jobs) - added)
        kind = "imagined" if self.config.environment == "dream" else "sim"
        bar = tqdm(total=len(ids), desc=f"iteration {it + 1}: {kind} episodes", unit="ep", disable=not self.progress)
        last, last_change = 0, time.monotonic()

        def progress(done: int) -> None:
            nonlocal last, last_change
            if done != last:
                bar.update(done - last)
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > 60:
                log.warning("no episode finished for a minute: are rollout workers running?", queue=self.queue.name)
                last_change = time.monotonic()

        try:
            while True:
                try:
                    raw = self.queue.wait_results(ids, timeout=2.0, on_progress=progress)
                    break
                except TimeoutError:
                    self._check_stop()
        finally:
            bar.close()
        results = [EpisodeResult.from_bytes(raw[i]) for i in ids if i in raw]
        if len(results) < len(ids):
            log.warning("episodes were dead-lettered", iteration=it + 1, lost=len(ids) - len(results))
        return results

    def _update(
        self,
        it: int,
        bundle: PolicyBundle,
        optimizer: torch.optim.Optimizer,
        kept: dict[int, list[EpisodeResult]],
        instruction_of: dict[int, str],
    ) -> UpdateStats:
        observations, proprio, tokens, logprobs, advantages, instructions = [], [], [], [], [], []
        for group, results in kept.items():
            instruction = instruction_of[group]
            adv = group_advantages([r.reward for r in results], self.grpo.advantage_eps)
            for result, a in zip(results, adv, strict=True):
                n = len(result.tokens)
                observations.append(result.observations)
                proprio.append(result.proprio)  # what the policy was sent with each chunk ([n, 0]: nothing)
                tokens.append(result.tokens)
                logprobs.append(result.logprobs)
                advantages.append(np.full(n, a, np.float32))
                instructions.extend([instruction] * n)
        samples = Samples(
            np.concatenate(observations),
            instructions,
            np.concatenate(tokens),
            np.concatenate(logprobs),
            np.concatenate(advantages),
            proprio=np.concatenate(proprio).astype(np.float32),
        )
        total = self.grpo.optimizer_steps(len(samples))
        bar = tqdm(total=total, desc=f"iteration {it + 1}: GRPO update", unit="step", disable=not self.progress)
        try:
            stats = grpo_update(
                bundle,
                optimizer,
                samples,
                self.grpo,
                np.random.default_rng([self.config.seed, it, 1]),
                on_step=advance_to(bar),
            )
        finally:
            bar.close()
        if stats.first_max_abs_log_ratio > 1e-3:
            log.warning(
                "rollout and learner log-probs differ at the first minibatch (ratio != 1)",
                max_abs_log_ratio=stats.first_max_abs_log_ratio,
            )
        return stats

    def _publish(
        self,
        it: int,
        bundle: PolicyBundle,
        optimizer: torch.optim.Optimizer,
        state: RunState,
        record: dict[str, Any],
    ) -> int:
        checkpoint = self.run_dir / "checkpoint"
        save_policy(bundle, checkpoint, info={"wmpo_run": self.run_id, "wmpo_iteration": it + 1})
        self._save_optimizer(optimizer, it)
        metadata = {
            "run_id": self.run_id,
            "iteration": str(it),
            "parent": str(state.policy_version),
            "environment": self.config.environment,
            self._success_key: f"{record[self._success_key]:.4f}",
        }
        info = self.policies.publish(checkpoint, metadata=metadata)
        log.info("published policy version", version=info.version, parent=state.policy_version)
        return info.version

    def _save_optimizer(self, optimizer: torch.optim.Optimizer, it: int) -> None:
        save_tensors(self.run_dir / "optimizer.pt", {"iteration": it, "state": optimizer.state_dict()})

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, state: RunState) -> None:
        path = self.run_dir / "optimizer.pt"
        if state.iteration == 0 or not path.is_file():
            return
        saved = load_tensors(path, self.config.device)
        if int(saved["iteration"]) == state.iteration - 1:
            optimizer.load_state_dict(saved["state"])
        else:
            log.warning("optimizer state does not match the resumed version; starting it fresh")

    def _wait_policy_swap(self, client: PolicyClient, version: int) -> float:
        """Block until the policy server's followed version is `version` (it hot-swaps on publish)."""
        began = time.monotonic()
        deadline = began + self.config.swap_timeout_s
        while True:
            try:
                listing = client.list_versions()
                if listing.current_version == version:
                    return time.monotonic() - began
                if listing.following not in ("", "latest"):
                    log.warning("the policy server follows another alias; not waiting", following=listing.following)
                    return time.monotonic() - began
            except PolicyClientError as exc:
                log.warning("policy server not answering", error=str(exc))
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the policy server at {self.settings.policy_address} did not serve version {version} within "
                    f"{self.config.swap_timeout_s:.0f} s (is it started with the same --registry and --redis?)"
                )
            self._check_stop()
            time.sleep(0.2)

    def _save_videos(self, it: int, results: list[EpisodeResult], wanted: set[str]) -> None:
        """GIFs of the episodes whose jobs asked for frames; an audited one shows imagined | real side by side."""
        videos = self.run_dir / "videos"
        for result in results:
            if result.job_id not in wanted or result.frames is None or not len(result.frames):
                continue
            name = (
                f"it{it + 1:04d}-g{result.group:02d}-e{result.index:02d}-{'success' if result.success else 'failure'}"
            )
            frames = result.frames
            if result.real_frames is not None and result.real_frames.shape == frames.shape:
                frames = np.concatenate([frames, result.real_frames], axis=2)
                name += f"-real-{'success' if result.real_success else 'failure'}"
            write_gif(frames, videos / f"{name}.gif")

    def _align(self, state: RunState, spec: WorldModelSpec) -> dict[str, Any]:
        """Align with `align_rollouts` real rollouts, or what is left of the real-episode budget (none: skip)."""
        from wmpo.trainer.alignment import align

        cfg = self.config
        rollouts = budget_groups(cfg.align_rollouts, 1, cfg.real_episode_budget, state.real_episodes)
        if rollouts == 0:
            log.warning("real-episode budget spent: no alignment", iteration=state.iteration,
                        real_episodes=state.real_episodes, real_episode_budget=cfg.real_episode_budget)  # fmt: skip
            return {"align_real_rollouts": 0}
        if rollouts < cfg.align_rollouts:
            log.info("alignment shrunk to the rest of the real-episode budget", rollouts=rollouts,
                     real_episodes=state.real_episodes, real_episode_budget=cfg.real_episode_budget)  # fmt: skip
        state.real_episodes += rollouts  # reserved before they run: a crash mid-alignment never uncounts them
        state.write(self.state_file)
        out = align(
            self.settings,
            cfg.model_copy(update={"align_rollouts": rollouts}),
            self.run_dir,
            state.policy_version,
            state.iteration,
            spec,
            progress=self.progress,
        )
        state.alignments += 1
        state.write(self.state_file)
        return out

    def _evaluate(self, state: RunState, image_size: int) -> dict[str, Any]:
        """Real evaluation on held-out seeds: measurement, counted as eval_episodes, not against the budget."""
        from wmpo.sim.evaluate import evaluate

        source = policy_source(self.settings, state.policy_version)
        report = evaluate(self.task, source, self.config.eval_episodes, workers=self.config.sim_workers,
                          image_size=image_size, camera=self.config.sim_camera)  # fmt: skip
        state.eval_episodes += report.episodes
        state.write(self.state_file)
        return {
            "real_success_rate": report.success_rate,
            "real_ci95_low": report.ci95_low,
            "real_ci95_high": report.ci95_high,
            "eval_episodes": report.episodes,
        }


def load_run(config_file: Path, run_id: str | None = None) -> tuple[TrainerSettings, RunConfig, str, str]:
    """(trainer settings, run config, run id, config text) from RUN.yaml; the run id defaults to its stem."""
    if not config_file.is_file():
        raise UserError(f"run config {config_file} does not exist")
    settings = TrainerSettings.load(config_file)
    config = RunConfig.load(config_file)
    return settings, config, run_id or config_file.stem, config_file.read_text()
