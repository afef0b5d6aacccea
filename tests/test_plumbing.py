"""Configuration, logging, metrics, status mapping and the `wmpo` CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from wmpo.common import metrics
from wmpo.common.cli import build_app
from wmpo.common.config import ConfigError
from wmpo.common.grpc_server import status_for
from wmpo.common.logs import configure_logging, get_logger
from wmpo.common.net import free_port
from wmpo.common.tensors import TensorError
from wmpo.policy.settings import PolicyServiceSettings
from wmpo.trainer.settings import TrainerSettings
from wmpo.worldmodel.settings import WorldModelServiceSettings


def test_settings_priority_is_overrides_then_env_then_yaml_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("policy:\n  port: 6000\n  max_batch_size: 4\n  device: cuda\nworldmodel:\n  sampler_steps: 2\n")
    assert PolicyServiceSettings.load().port == 50051
    monkeypatch.setenv("WMPO_POLICY_MAX_BATCH_SIZE", "8")
    settings = PolicyServiceSettings.load(run, device=None, port=7000)
    assert (settings.port, settings.max_batch_size, settings.device) == (7000, 8, "cuda")
    assert WorldModelServiceSettings.load(run).sampler_steps == 2
    assert TrainerSettings.load(run).redis_url.startswith("redis://")


def test_settings_errors_name_the_setting_and_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WMPO_POLICY_PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"policy\.port: .*'not-a-port' \(from \$WMPO_POLICY_PORT\)"):
        PolicyServiceSettings.load()
    monkeypatch.delenv("WMPO_POLICY_PORT")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  prot: 1\n")
    with pytest.raises(ConfigError, match="unknown policy setting\\(s\\) prot"):
        PolicyServiceSettings.load(bad)
    bad.write_text("success_threshold: 1.5\n")
    with pytest.raises(ConfigError, match=r"worldmodel\.success_threshold: .*1\.5 \(from .*bad\.yaml\)"):
        WorldModelServiceSettings.load(bad)
    bad.write_text("policy: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        PolicyServiceSettings.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        PolicyServiceSettings.load(tmp_path / "missing.yaml")


def test_every_setting_is_documented() -> None:
    for cls in (PolicyServiceSettings, WorldModelServiceSettings, TrainerSettings):
        for name, env, _default, doc in cls.describe_fields():
            assert doc, f"{cls.__name__}.{name} has no description"
            assert env.startswith(cls.env_prefix().upper())


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json=True, service="policy")
    get_logger("wmpo.test", run="r1").info("loaded", version=3)
    logging.getLogger("thirdparty").warning("plain stdlib")
    get_logger("wmpo.test").debug("hidden")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [line["event"] for line in lines] == ["loaded", "plain stdlib"]
    assert lines[0] | {"timestamp": None} == {
        "event": "loaded", "run": "r1", "version": 3, "level": "info", "logger": "wmpo.test",
        "service": "policy", "timestamp": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match="log level must be one of"):
        configure_logging("LOUD")
    configure_logging("WARNING")


def test_metrics_are_idempotent_and_served() -> None:
    hist = metrics.histogram("test_latency_seconds", "A test latency.", labels=["method"])
    assert metrics.histogram("test_latency_seconds", "A test latency.", labels=["method"]) is hist
    with metrics.timed(hist.labels(method="Act")):
        pass
    metrics.counter("test_requests", "Requests.").inc(3)
    with pytest.raises(ValueError, match="already exists as a Counter"):
        metrics.gauge("test_requests", "Clash.")
    port = metrics.serve_metrics(free_port(), host="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'wmpo_test_latency_seconds_count{method="Act"} 1.0' in body
    assert "wmpo_test_requests_total 3.0" in body


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TensorError("x", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (TensorError("x", "big", too_large=True), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (KeyError("version 9"), grpc.StatusCode.NOT_FOUND),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ConnectionError(), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError(), grpc.StatusCode.INTERNAL),
    ],
)
def test_exceptions_map_to_grpc_status_codes(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(exc) == code


def test_cli_help_version_and_service_groups() -> None:
    runner = CliRunner()
    app = build_app()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("version", "policy", "worldmodel", "trainer"):
        assert group in result.output
    result = runner.invoke(app, ["version", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["libraries"]["torch"].startswith("2.13.0")
    result = runner.invoke(app, ["worldmodel", "config", "--json"])
    assert json.loads(result.output)["success_threshold"] == 0.96


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    wmpo = [sys.executable, "-m", "wmpo.common.cli"]
    ok = subprocess.run([*wmpo, "version"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.startswith("wmpo ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  max_batch_size: 0\n")
    result = subprocess.run(
        [*wmpo, "policy", "config", "--config", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("wmpo: error: invalid configuration: policy.max_batch_size")
    usage = subprocess.run([*wmpo, "no-such-command"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2


def test_process_ref_is_not_fooled_by_a_recycled_pid(tmp_path: Path) -> None:
    from wmpo.common.process import ProcessRef, is_running, read_tail, spawn, terminate

    child = spawn([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], tmp_path / "c.log")
    ref = ProcessRef.of(child.pid)
    assert ref.ticks is not None and ref.leader_running() and ref.alive()
    impostor = ProcessRef(child.pid, ref.ticks + 1)  # same pid, another start time: a recycled pid
    assert not impostor.ours() and not impostor.leader_running() and not impostor.alive()
    assert terminate([impostor], timeout=0.5) == [] and is_running(child.pid)  # never signals what is not ours
    assert terminate([ref], timeout=10) == [] and not is_running(child.pid)
    assert read_tail(tmp_path / "c.log", 5)[0].startswith("==== ")


def test_file_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    from wmpo.common.fsutil import file_lock

    with file_lock(tmp_path / "d" / ".lock"):
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from wmpo.common.fsutil import file_lock\n"
             f"with file_lock(Path({str(tmp_path / 'd' / '.lock')!r}), blocking=False): pass"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr
    with file_lock(tmp_path / "d" / ".lock", blocking=False):
        pass
