"""`wmpo stack`: the real services as local processes (real Redis, real Triton, real policy server).

Models are tiny and untrained, published into a registry in a temporary directory. Every test checks
that nothing it started is left behind: no process mentions the test's directory and every port is free.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from policy_fixtures import make_checkpoint

from wmpo.common.errors import UserError
from wmpo.common.net import free_port, port_free
from wmpo.common.process import group_members, is_running
from wmpo.common.redis_server import ping
from wmpo.common.registry import Registry
from wmpo.stack.settings import StackSettings
from wmpo.stack.stack import Stack
from wmpo.trainer.settings import TrainerSettings

SIZE = 32
PORT_KEYS = ("redis_port", "triton_grpc_port", "triton_http_port", "triton_metrics_port", "policy_port",
             "policy_metrics_port", "worker_metrics_port", "api_port")  # fmt: skip


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with a tiny world model, reward model and policy (random weights)."""
    import torch

    from wmpo.worldmodel.checkpoint import save_world_model
    from wmpo.worldmodel.model import make_world_model
    from wmpo.worldmodel.reward.checkpoint import save_reward_model
    from wmpo.worldmodel.reward.model import RewardModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_world_model(make_world_model("tiny", image_size=SIZE), root / "wm", {"steps": 0})
    save_reward_model(RewardModel.create("tiny", SIZE, 8), root / "reward")
    make_checkpoint(root / "policy")
    reg = root / "registry"
    Registry(reg, "worldmodel").publish(root / "wm")
    Registry(reg, "reward").publish(root / "reward")
    Registry(reg, "policy").publish(root / "policy")
    return reg


def _ports(workers: int = 1) -> dict[str, int]:
    """Free ports for every service; worker i gets worker_metrics_port + i, so those must be free too."""
    ports = {key: free_port() for key in PORT_KEYS}
    while not all(port_free("127.0.0.1", ports["worker_metrics_port"] + i) for i in range(workers)):
        ports["worker_metrics_port"] = free_port()
    return ports


def _option_args(state: Path, registry: Path, ports: dict[str, int]) -> list[str]:
    args = ["--dir", str(state), "--registry", str(registry), "--timeout", "120"]
    for key, port in ports.items():
        args += [f"--{key.replace('_', '-')}", str(port)]
    return args


def _wmpo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wmpo.common.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or working directory mentions `text` (a test's own directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = str((entry / "cwd").readlink())
        except OSError:
            continue
        if (text in cmdline or text in cwd) and is_running(int(entry.name)):
            found.append(f"{entry.name}: {cmdline[:200]} (in {cwd})")
    return found


def _assert_nothing_left(state: Path, ports: dict[str, int], pids: list[int]) -> None:
    for pid in pids:
        assert not is_running(pid) and not group_members(pid), f"pid {pid} (or its group) is still alive"
    assert _processes_mentioning(str(state.parent)) == []
    busy = [f"{key}={port}" for key, port in ports.items() if not port_free("127.0.0.1", port)]
    assert busy == []
    records = json.loads((state / "stack.json").read_text())["services"]
    assert [r["name"] for r in records if r["pid"] is not None] == []


@pytest.mark.triton
def test_up_status_logs_down_leave_nothing_behind(registry: Path, tmp_path: Path) -> None:
    state, ports = tmp_path / "stack", _ports(workers=2)
    args = _option_args(state, registry, ports)
    up = _wmpo("stack", "up", "--workers", "2", "--runs-dir", str(tmp_path / "runs"), *args)
    assert up.returncode == 0, up.stderr
    names = ["redis", "dream", "policy", "worker-0", "worker-1", "api"]
    pids: list[int] = []
    try:
        records = json.loads((state / "stack.json").read_text())["services"]
        pids = [r["pid"] for r in records]
        assert [r["name"] for r in records] == names
        assert all(is_running(pid) for pid in pids)  # `up` returned; the services keep running

        status = _wmpo("stack", "status", "--dir", str(state), "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        shown = {s["name"]: s for s in json.loads(status.stdout)}
        assert {name: s["state"] for name, s in shown.items()} == dict.fromkeys(names, "healthy")
        assert shown["dream"]["ports"] == {"grpc": ports["triton_grpc_port"], "http": ports["triton_http_port"],
                                           "metrics": ports["triton_metrics_port"]}  # fmt: skip
        assert shown["worker-1"]["ports"] == {"metrics": ports["worker_metrics_port"] + 1}

        stack = Stack(StackSettings(dir=state))
        from wmpo.worldmodel.serving.client import WorldModelClient

        dream = WorldModelClient(stack.dream_address)
        assert dream.spec().image_size == SIZE  # the registry's world model, served by Triton
        dream.close()
        assert stack.redis_url == f"redis://127.0.0.1:{ports['redis_port']}/0"
        assert stack.policy_address == f"grpc://127.0.0.1:{ports['policy_port']}"
        assert stack.api_url == f"http://127.0.0.1:{ports['api_port']}"
        assert list((state / "redis").glob("appendonly*"))  # jobs survive a Redis restart

        again = _wmpo("stack", "up", "--services", "redis", *args)
        assert again.returncode == 2
        assert "a stack is already running" in again.stderr and "wmpo stack down" in again.stderr

        logs = _wmpo("stack", "logs", "dream", "-n", "200", "--dir", str(state))
        assert logs.returncode == 0 and f"grpc {ports['triton_grpc_port']}" in logs.stdout
        every = _wmpo("stack", "logs", "-n", "5", "--dir", str(state))
        assert {line.split("|")[0].strip() for line in every.stdout.splitlines()} == set(names)
    finally:
        down = _wmpo("stack", "down", "--dir", str(state))
    assert down.returncode == 0, down.stderr
    _assert_nothing_left(state, ports | {"worker_1": ports["worker_metrics_port"] + 1}, pids)
    after = _wmpo("stack", "status", "--dir", str(state), "--json")
    assert after.returncode == 1 and {s["state"] for s in json.loads(after.stdout)} == {"stopped"}


def test_a_service_that_cannot_start_stops_the_stack_with_one_line(registry: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-world-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    state, ports = tmp_path / "stack", _ports()
    result = _wmpo("stack", "up", "--services", "redis,dream", "--worldmodel-checkpoint", str(bad),
                   *_option_args(state, registry, ports))  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("wmpo: error: dream exited before it was healthy") and "dream.log" in last
    assert "last lines of dream's log" in result.stderr
    _assert_nothing_left(state, ports, [])


def test_python_api_context_manager_stale_state_and_refusal(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    settings = StackSettings(dir=state, redis_port=0)
    with Stack(settings, services="redis") as stack:
        host, port = stack.redis_url.removeprefix("redis://").removesuffix("/0").split(":")
        assert ping(host, int(port))
        assert TrainerSettings.load(None, **stack.trainer_overrides()).redis_url == stack.redis_url
        with pytest.raises(UserError, match="a stack is already running"):
            Stack(settings).up("redis")
        (redis,) = stack.status()
        assert (redis.name, redis.state) == ("redis", "healthy")
        os.kill(redis.pid or 0, signal.SIGKILL)  # a crash: stack.json now names a dead pid
        assert _wait(lambda: stack.status()[0].state == "exited")
        stack.up("redis")  # the stale state is replaced
        (again,) = stack.status()
        assert again.healthy and again.pid != redis.pid
    _assert_nothing_left(state, {"first": int(port), "second": again.ports["redis"]}, [redis.pid or 0, again.pid or 0])


def test_unknown_services_and_missing_needs_are_one_line_errors(tmp_path: Path) -> None:
    for services, message in (("redis,foo", "unknown service(s) foo"), ("worker", "worker needs redis, policy")):
        result = _wmpo("stack", "up", "--dir", str(tmp_path), "--services", services)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


def test_foreground_stack_goes_down_on_sigterm(tmp_path: Path) -> None:
    state, port, err = tmp_path / "stack", free_port(), tmp_path / "stderr.txt"
    cli = [sys.executable, "-m", "wmpo.common.cli", "stack", "up", "--foreground", "--services", "redis",
           "--dir", str(state), "--redis-port", str(port)]  # fmt: skip
    with err.open("w") as stderr:
        proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        assert _wait(lambda: "running in the foreground" in err.read_text(), timeout=30), err.read_text()
        (redis,) = Stack(StackSettings(dir=state)).status()
        assert redis.healthy and ping("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped redis" in err.read_text()
    _assert_nothing_left(state, {"redis_port": port}, [redis.pid or 0])


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
