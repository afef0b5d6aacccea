"""The demo pipeline: its profiles (`full`, `quick`) and its stages, run by `Demo` on the local stack.

Stages, each cached in the work directory so a second run resumes instead of recomputing:
data (expert + noisy episodes in the real simulator) → base policy by imitation → world model → reward
model → fidelity of the base world model → the local stack (Redis, Triton, policy server, rollout workers,
control plane) → WMPO iterations with policy-behaviour alignment → real-simulator evaluation of the base and
the final policy (held-out seeds) → fidelity of the aligned world model on the policy's own rollouts → the
stack torn down → `demo-report/index.html` and `report.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import yaml

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_write_text
from wmpo.trainer.progress import advance_to

if TYPE_CHECKING:
    from wmpo.stack.stack import Stack


@dataclass(frozen=True)
class DemoProfile:
    """How big each stage is. `full` targets ≤ 20 minutes on 2 CPU cores, `quick` about 3."""

    name: str
    task: str = "reach"
    image_size: int = 32
    expert_episodes: int = 30
    noisy_episodes: int = 20
    noise: float = 1.0
    heldout_episodes: int = 4
    bc_steps: int = 800
    wm_steps: int = 800
    reward_steps: int = 600
    iterations: int = 5
    groups: int = 6
    group_size: int = 8
    horizon: int = 48
    success_threshold: float = 0.8
    lr: float = 2e-4
    epochs: int = 2
    minibatch_size: int = 64
    align_every: int = 2
    align_rollouts: int = 12
    align_wm_steps: int = 100
    align_reward_steps: int = 100
    eval_episodes: int = 24
    workers: int = 2
    worker_concurrency: int = 16
    sim_workers: int = 2


PROFILES = {
    "full": DemoProfile("full"),
    "quick": DemoProfile(
        "quick", expert_episodes=6, noisy_episodes=4, heldout_episodes=2, bc_steps=40, wm_steps=40,
        reward_steps=60, iterations=2, groups=2, group_size=4, horizon=24, align_every=1, align_rollouts=2,
        align_wm_steps=5, align_reward_steps=5, eval_episodes=4, workers=1, worker_concurrency=8,
        minibatch_size=16, epochs=1,
    ),
}  # fmt: skip
HELDOUT_SEED = 900_000  # below the evaluation range, far from the collection seeds


class Stages:
    """Stage results cached in ``<work>/stages.json``: a finished stage is not run again."""

    def __init__(self, work: Path) -> None:
        self.path = work / "stages.json"
        self.done: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, title: str, fn: Callable[[], dict[str, Any]], *, cache: bool = True) -> dict[str, Any]:
        if cache and name in self.done:
            typer.secho(f"✓ {title} (cached)", fg="green", err=True)
            return self.done[name]
        typer.secho(f"▶ {title}", bold=True, err=True)
        began = time.monotonic()
        out = fn()
        out["seconds"] = time.monotonic() - began
        if cache:
            self.done[name] = out
            atomic_write_text(self.path, json.dumps(self.done, indent=2, default=str))
        return out


class Demo:
    """One demo run: a profile, a work directory (cache) and a report directory."""

    def __init__(self, profile: DemoProfile, work: Path, out: Path, device: str = "cpu") -> None:
        self.profile, self.work, self.out, self.device = profile, work, out, device
        self.data, self.heldout = work / "data", work / "heldout"
        self.registry = work / "registry"
        self.stages = Stages(work)

    # -- stages ----------------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        from tqdm import tqdm

        from wmpo.sim.rollout import run_many
        from wmpo.sim.sources import SourceSpec
        from wmpo.sim.tasks import get_task

        p, task = self.profile, get_task(self.profile.task)
        for folder in (self.data, self.heldout):
            shutil.rmtree(folder, ignore_errors=True)  # a half-written earlier attempt
        plan = [
            (SourceSpec("expert", noise=0.1), list(range(p.expert_episodes)), self.data),
            (SourceSpec("expert", noise=p.noise), list(range(1000, 1000 + p.noisy_episodes)), self.data),
            (SourceSpec("expert", noise=0.5), list(range(HELDOUT_SEED, HELDOUT_SEED + p.heldout_episodes)),
             self.heldout),
        ]  # fmt: skip
        successes, total = 0, sum(len(seeds) for _, seeds, _ in plan)
        with tqdm(total=total, desc="real episodes", unit="ep") as bar:
            for source, seeds, folder in plan:
                for result in run_many(task, source, seeds, workers=p.sim_workers, image_size=p.image_size,
                                       out_dir=folder, steps_after_success=8):  # fmt: skip
                    successes += int(folder == self.data and result.success)
                    bar.update(1)
        episodes = p.expert_episodes + p.noisy_episodes
        return {"episodes": episodes, "heldout": p.heldout_episodes, "success_rate": successes / episodes}

    def train_policy(self) -> dict[str, Any]:
        from tqdm import tqdm

        from wmpo.common.registry import Registry
        from wmpo.policy.train import BCConfig, train_bc

        steps = self.profile.bc_steps
        config = BCConfig(steps=steps, eval_every=max(1, steps // 4), device=self.device, use_proprio=False)
        with tqdm(total=steps, desc="base policy (imitation)", unit="step") as bar:
            result = train_bc(self.data, self.work / "policy", config, on_step=advance_to(bar))
        info = Registry(self.registry, "policy").publish(result.checkpoint, metadata={"note": "demo base (BC)"})
        return {"steps": result.steps, "train_loss": result.train_loss, "val_losses": result.val_losses,
                "version": info.version}  # fmt: skip

    def train_world_model(self) -> dict[str, Any]:
        from tqdm import tqdm

        from wmpo.common.registry import Registry
        from wmpo.worldmodel.train import WMTrainConfig, train_world_model

        steps = self.profile.wm_steps
        config = WMTrainConfig(steps=steps, lr=5e-4, eval_every=max(1, steps // 3), device=self.device,
                               warmup_steps=min(50, steps // 5))  # fmt: skip
        with tqdm(total=steps, desc="world model", unit="step") as bar:
            result = train_world_model(self.data, self.work / "worldmodel", config,
                                       on_step=advance_to(bar))  # fmt: skip
        info = Registry(self.registry, "worldmodel").publish(result.checkpoint, metadata={"note": "demo base"})
        return {"steps": result.steps, "train_loss": result.train_loss, "evals": result.evals, "version": info.version}

    def train_reward(self) -> dict[str, Any]:
        from tqdm import tqdm

        from wmpo.common.registry import Registry
        from wmpo.worldmodel.reward.train import RewardConfig, train_reward

        steps = self.profile.reward_steps
        config = RewardConfig(steps=steps, threshold=self.profile.success_threshold, device=self.device)
        with tqdm(total=steps, desc="reward model", unit="step") as bar:
            model, metrics = train_reward(self.data, self.work / "reward", config, on_step=advance_to(bar))
        threshold = self._calibrate(model)
        info = Registry(self.registry, "reward").publish(self.work / "reward", metadata={"note": "demo base"})
        return {"steps": steps, "metrics": metrics, "version": info.version, "threshold": threshold}

    def _calibrate(self, model: Any) -> float:
        """The run's success threshold: best F1 on the held-out episodes' clips (the profile's when none succeed)."""
        import numpy as np

        from wmpo.data.dataset import TrajectoryDataset
        from wmpo.worldmodel.reward.metrics import calibrate_threshold

        clips = TrajectoryDataset(self.heldout).reward_clips(model.clip_len)
        if len(clips) == 0:
            return self.profile.success_threshold
        frames = np.stack([clips[i]["frames"] for i in range(len(clips))])
        probs = np.concatenate([model.probability(frames[i : i + 32]) for i in range(0, len(frames), 32)])
        threshold = calibrate_threshold(probs, clips.labels() > 0.5)
        return self.profile.success_threshold if threshold is None else threshold

    def fidelity(self, which: str, episodes_from: Path, source_prefix: str | None = None) -> dict[str, Any]:
        from wmpo.common.registry import Registry
        from wmpo.data.dataset import TrajectoryDataset
        from wmpo.worldmodel.checkpoint import load_world_model
        from wmpo.worldmodel.metrics import evaluate_fidelity

        info = Registry(self.registry, "worldmodel").get("latest")
        model, _ = load_world_model(info.path, self.device)
        dataset = TrajectoryDataset(episodes_from)
        picked = [e for e in dataset.episodes if source_prefix is None or e.source.startswith(source_prefix)]
        episodes = [dataset.episode(e.episode_id) for e in picked[-max(2, self.profile.heldout_episodes) :]]
        report = evaluate_fidelity(model, episodes, horizons=(1, 4, 8, 16), video_dir=self.out / "videos" / which)
        return {"world_model_version": info.version, **report.as_dict()}

    def wmpo(self, stack: Stack) -> dict[str, Any]:
        from wmpo.trainer.learner import Learner, load_run

        p = self.profile
        threshold = self.stages.done["reward"].get("threshold", p.success_threshold)
        config = {
            "trainer": {
                "redis_url": stack.redis_url, "policy_address": stack.policy_address,
                "dream_address": stack.dream_address, "registry_dir": str(self.registry),
                "runs_dir": str(self.work / "runs"), "worker_concurrency": p.worker_concurrency,
            },
            "run": {
                "task": p.task, "dataset": str(self.data), "iterations": p.iterations,
                "groups_per_iteration": p.groups, "group_size": p.group_size, "horizon": p.horizon,
                "success_threshold": threshold, "lr": p.lr, "epochs": p.epochs, "minibatch_size": p.minibatch_size,
                "align_every": p.align_every, "align_rollouts": p.align_rollouts,
                "align_world_model_steps": p.align_wm_steps, "align_reward_steps": p.align_reward_steps,
                "sim_workers": p.sim_workers, "videos_per_iteration": 4, "device": self.device,
            },
        }  # fmt: skip
        path = self.work / "demo.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        settings, run, run_id, text = load_run(path, "demo")
        state = Learner(settings, run, run_id, text).run()
        if state.iteration < run.iterations:
            raise UserError(f"the WMPO run stopped after {state.iteration}/{run.iterations} iterations")
        history = [json.loads(line) for line in (self.work / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]  # fmt: skip
        return {"base_version": state.initial_version, "final_version": state.policy_version,
                "episodes": state.episodes, "frames": state.frames, "alignments": state.alignments,
                "iterations": history}  # fmt: skip

    def evaluate(self, stack: Stack, which: str, version: int) -> dict[str, Any]:
        from tqdm import tqdm

        from wmpo.sim.evaluate import evaluate
        from wmpo.sim.sources import SourceSpec
        from wmpo.sim.tasks import get_task

        p = self.profile
        source = SourceSpec(stack.policy_address, version=str(version), temperature=0.0)
        with tqdm(total=p.eval_episodes, desc=f"real evaluation, {which} policy (v{version})", unit="ep") as bar:
            report = evaluate(get_task(p.task), source, p.eval_episodes, workers=p.sim_workers, image_size=p.image_size,
                              video_dir=self.out / "videos" / f"eval-{which}", videos=2,
                              on_episode=lambda _r: bar.update(1))  # fmt: skip
        return {"version": version, **report.as_dict()}

    # -- the whole thing -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from wmpo.stack.settings import StackSettings
        from wmpo.stack.stack import Stack

        began = time.monotonic()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        s = self.stages
        data = s.run("data", "collect expert and noisy episodes in the simulator", self.collect)
        bc = s.run("policy", "train the base policy by imitation", self.train_policy)
        wm = s.run("worldmodel", "train the world model", self.train_world_model)
        reward = s.run("reward", "train the reward model", self.train_reward)
        fid_base = s.run("fidelity-base", "world-model fidelity (base, held-out episodes)",
                         lambda: self.fidelity("fidelity-base", self.heldout))  # fmt: skip
        p = self.profile
        stack = Stack(
            StackSettings(
                dir=self.work / "stack", redis_port=0, triton_grpc_port=0, triton_http_port=0, triton_metrics_port=0,
                policy_port=0, policy_metrics_port=0, worker_metrics_port=0, api_port=0, workers=p.workers,
                worker_concurrency=p.worker_concurrency, registry_dir=self.registry, runs_dir=self.work / "runs",
                device=self.device,
            ),
            progress=lambda line: typer.echo(f"  {line}", err=True),
        )  # fmt: skip
        needs_stack = any(name not in s.done for name in ("wmpo", "eval-base", "eval-final"))
        try:
            if needs_stack:
                s.run("stack", "bring the local stack up", lambda: {"services": [st.name for st in stack.up()]},
                      cache=False)  # fmt: skip
                typer.echo(f"  control plane: {stack.api_url}  (runs, versions, dashboard)", err=True)
            run = s.run("wmpo", "WMPO: GRPO in the world model, with policy-behaviour alignment",
                        lambda: self.wmpo(stack))  # fmt: skip
            base = s.run("eval-base", "evaluate the base policy in the real simulator",
                         lambda: self.evaluate(stack, "base", run["base_version"]))  # fmt: skip
            final = s.run("eval-final", "evaluate the final policy in the real simulator",
                          lambda: self.evaluate(stack, "final", run["final_version"]))  # fmt: skip
        finally:
            if needs_stack:
                s.run("stack-down", "tear the stack down", lambda: _down(stack), cache=False)
        fid_final = s.run("fidelity-final", "world-model fidelity (aligned, on the policy's own rollouts)",
                          lambda: self.fidelity("fidelity-final", self.data, source_prefix="policy:"))  # fmt: skip
        report = {
            "profile": asdict(p), "task": p.task, "wall_s": time.monotonic() - began,
            "stage_seconds": {name: out.get("seconds", 0.0) for name, out in s.done.items()},
            "data": data, "policy": bc, "world_model": wm, "reward": reward,
            "fidelity": {"base": fid_base, "final": fid_final}, "wmpo": run,
            "eval": {"base": base, "final": final},
        }  # fmt: skip
        from wmpo.demo.report import write_report

        write_report(report, self.out, self.work / "runs" / "demo" / "videos")
        return report


def _down(stack: Stack) -> dict[str, Any]:
    result = stack.down()
    if not result.clean:
        typer.secho(f"  warning: left behind: {result.survivors} ports {result.busy_ports}", fg="yellow", err=True)
    return {"stopped": result.stopped, "clean": result.clean}
