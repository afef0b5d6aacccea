"""Online GRPO in the real simulator through the services, then a paired evaluation of base vs trained policy.

    .venv/bin/python bench/online_grpo.py --base CKPT --work DIR [--minutes 60] [--task button-press]
        [--lr 1e-4] [--temperature 1.0] [--target-kl 0.02] [--groups 4] [--group-size 8] [--workers 2]
        [--eval-episodes 200] [--budgets 32,64,128,256]

1. A local stack (`wmpo stack up`: Redis, the policy server, rollout workers; no Triton) serving the base
   policy as registry version 1.
2. `wmpo train` with ``environment: sim`` until `--minutes` pass (then SIGTERM: it stops at a safe point).
3. Evaluation on the same held-out seeds (`--eval-seed`, 1,000,000+; pilots that choose settings use a
   validation range such as 800,000+, never the evaluation seeds) for every arm, greedy and at the rollout temperature:
   the base, the final version, and the versions published when the run had used each of `--budgets` real
   episodes (the budget curve). Paired comparisons (Wilson intervals, Newcombe's interval of the difference,
   exact McNemar) go to ``DIR/summary.json`` and are printed; every evaluation's JSON stays in ``DIR/eval/``.
Nothing is tuned on the evaluation seeds: the run ends with the version it ends with.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

WMPO = [sys.executable, "-m", "wmpo.common.cli"]


def wmpo(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WMPO, *args], check=True, text=True, capture_output=True, **kwargs)


def run_config(work: Path, stack: dict[str, Any], args: argparse.Namespace) -> Path:
    config = {
        "trainer": {
            "redis_url": stack["redis_url"], "policy_address": stack["policy_address"],
            "registry_dir": str(work / "registry"), "runs_dir": str(work / "runs"),
        },
        "run": {
            "task": args.task, "environment": "sim", "policy": "1", "iterations": 100_000,
            "groups_per_iteration": args.groups, "group_size": args.group_size, "temperature": args.temperature,
            "lr": args.lr, "target_kl": args.target_kl, "epochs": args.epochs, "minibatch_size": args.minibatch,
            "keep_low": 0.1, "keep_high": 0.9, "videos_per_iteration": 0, "seed": args.seed,
        },
    }  # fmt: skip
    path = work / "online-grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluate(work: Path, args: argparse.Namespace, name: str, policy: str, temperature: float) -> Path:
    out = work / "eval" / f"{name}-T{temperature:g}.json"
    if not out.is_file():
        done = wmpo("eval", "--policy", policy, "--task", args.task, "--episodes", str(args.eval_episodes),
                    "--temperature", str(temperature), "--workers", str(args.workers), "--seed", str(args.eval_seed),
                    "--json")  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(done.stdout)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="The BC base policy checkpoint.")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--task", default="button-press")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--target-kl", type=float, default=0.02)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minibatch", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--eval-seed", type=int, default=1_000_000, help="First evaluation seed (pilots: 800000+).")
    parser.add_argument("--budgets", default="32,64,128,256")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    registry = work / "registry"
    if not (registry / "policy").is_dir():
        wmpo("policy", "publish", str(args.base), "--registry", str(registry))
    stack_dir = work / "stack"
    up = ["stack", "up", "--dir", str(stack_dir), "--services", "redis,policy,worker", "--workers", str(args.workers),
          "--registry", str(registry), "--runs-dir", str(work / "runs"), "--redis-port", "0", "--policy-port", "0",
          "--policy-metrics-port", "0", "--worker-metrics-port", "0"]  # fmt: skip
    wmpo(*up)
    try:
        state = json.loads((stack_dir / "stack.json").read_text())
        ports = state["ports"]
        addresses = {"redis_url": f"redis://127.0.0.1:{ports['redis_port']}/0",
                     "policy_address": f"grpc://127.0.0.1:{ports['policy_port']}"}  # fmt: skip
        config = run_config(work, addresses, args)
        log = (work / "train.log").open("a")
        began = time.monotonic()
        learner = subprocess.Popen([*WMPO, "train", "--config", str(config), "--no-progress"], stdout=log,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        try:
            learner.wait(timeout=args.minutes * 60)
        except subprocess.TimeoutExpired:
            learner.send_signal(signal.SIGTERM)
            learner.wait(timeout=600)
        train_s = time.monotonic() - began
        run_dir = work / "runs" / config.stem
        metrics = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.is_file() else []
        if not records:
            raise SystemExit(f"the run finished no iteration in {args.minutes} minutes: see {work / 'train.log'}")
        final = int(json.loads((run_dir / "state.json").read_text())["policy_version"])
        budget_versions: dict[int, int] = {}
        for budget in (int(b) for b in args.budgets.split(",") if b):
            reached = [r for r in records if r.get("real_episodes_total", 0) >= budget]
            if reached:
                budget_versions[budget] = int(reached[0]["new_policy_version"])
        policy = addresses["policy_address"]
        arms = {"base": 1, "final": final, **{f"after-{b}": v for b, v in budget_versions.items()}}
        files: dict[str, dict[float, Path]] = {}
        for name, version in arms.items():
            temperatures = [0.0, args.temperature] if name in ("base", "final") else [0.0]
            files[name] = {t: evaluate(work, args, name, f"{policy}?version={version}", t) for t in temperatures}
    finally:
        wmpo("stack", "down", "--dir", str(stack_dir))
    summary: dict[str, Any] = {
        "train_s": train_s, "iterations": len(records), "final_version": final,
        "real_episodes": records[-1].get("real_episodes_total") if records else 0,
        "budget_versions": budget_versions, "comparisons": {},
    }  # fmt: skip
    for name, by_temperature in files.items():
        for t, path in by_temperature.items():
            if name == "base":
                continue
            compared = wmpo("eval", "compare", str(path), str(files["base"][t]), "--json")
            summary["comparisons"][f"{name} vs base, T={t:g}"] = json.loads(compared.stdout)
            print(wmpo("eval", "compare", str(path), str(files["base"][t])).stdout)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "comparisons"}, indent=2))


if __name__ == "__main__":
    main()
