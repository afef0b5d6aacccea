"""The trainer's run store and its FastAPI control plane, against real processes, a real Redis and a real registry."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from wmpo.common.media import write_gif
from wmpo.common.net import free_port, port_is_open, wait_until
from wmpo.common.process import is_running
from wmpo.common.registry import Registry
from wmpo.trainer.control.app import create_app
from wmpo.trainer.control.launcher import LearnerLauncher
from wmpo.trainer.control.plots import svg_lines, svg_plot
from wmpo.trainer.control.runs import (
    DIED_ERROR,
    InvalidRunIdError,
    RunExistsError,
    RunNotFoundError,
    RunStore,
)
from wmpo.trainer.settings import TrainerSettings

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUN_YAML = "trainer:\n  redis_url: redis://127.0.0.1:1/0\nrun:\n  task: button-press\n  iterations: 5\n"

# A stand-in learner: writes metrics through the store each iteration and, on SIGTERM, stops at a safe point.
FAKE_LEARNER = """
import os, signal, sys, time
from pathlib import Path
from wmpo.trainer.control.runs import RunStore
args = sys.argv[1:]
config = Path(args[args.index("--config") + 1])
run_id = args[args.index("--run-id") + 1]
assert os.environ["WMPO_TRAINER_RUNS_DIR"] == str(config.parent.parent.resolve()), "the learner is told the store"
store = RunStore(Path(os.environ["WMPO_TRAINER_RUNS_DIR"]))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("learner up", flush=True)
it = 0
while not stop:
    it += 1
    store.append_metrics(run_id, {"iteration": it, "loss": 1.0 / it})
    store.update(run_id, iteration=it)
    time.sleep(0.05)
print("got SIGTERM at iteration", it, flush=True)
store.update(run_id, status="stopped")
"""
STUBBORN_LEARNER = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ignoring SIGTERM', flush=True)\ntime.sleep(120)\n"  # noqa: E501
CRASHING_LEARNER = "import sys\nprint('config is broken', flush=True)\nsys.exit(3)\n"


def _launcher(tmp_path: Path, script: str = FAKE_LEARNER) -> LearnerLauncher:
    return LearnerLauncher(_store(tmp_path), command=[sys.executable, "-c", script])


def _store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "runs")


@pytest.fixture
def cleanup() -> Iterator[list[LearnerLauncher]]:
    """Launchers whose learner processes are killed after the test, whatever happened."""
    launchers: list[LearnerLauncher] = []
    yield launchers
    for launcher in launchers:
        for record in launcher.store.list():
            if record.pid is not None and is_running(record.pid):
                os.killpg(record.pid, signal.SIGKILL)


def _settings(tmp_path: Path, redis_url: str = "") -> TrainerSettings:
    return TrainerSettings.load(
        None, runs_dir=tmp_path / "runs", registry_dir=tmp_path / "registry", redis_url=redis_url
    )


def _client(
    tmp_path: Path, token: str | None = TOKEN, redis_url: str = "", launcher: LearnerLauncher | None = None
) -> TestClient:
    app = create_app(_settings(tmp_path, redis_url), token, launcher=launcher or _launcher(tmp_path), stop_timeout=10)
    return TestClient(app)


def _checkpoint(path: Path, payload: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(payload)
    return path


# -- the run store --------------------------------------------------------------------------------------
def test_store_creates_lists_and_updates_runs(tmp_path: Path) -> None:
    store = _store(tmp_path)
    generated = store.create(RUN_YAML)
    assert re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{4}", generated.run_id)
    assert (generated.status, generated.iteration, generated.iterations) == ("pending", 0, 5)
    assert generated.config_path.read_text() == RUN_YAML, "config.yaml is the run's YAML verbatim"
    assert generated.videos_dir.is_dir() and generated.tensorboard_dir.is_dir()
    for run_id in ("run-c", "run-b", "run-a"):
        time.sleep(0.002)  # distinct creation timestamps (millisecond resolution)
        store.create(RUN_YAML, run_id)
    assert [r.run_id for r in store.list()] == ["run-a", "run-b", "run-c", generated.run_id]

    with pytest.raises(RunExistsError, match="exists already"):
        store.create(RUN_YAML, "run-a")
    for bad in ("", "Upper", "-dash", "a/b", "..", "x" * 64):
        with pytest.raises(InvalidRunIdError, match="invalid run id"):
            store.create(RUN_YAML, bad)
    with pytest.raises(ValueError, match="not valid YAML"):
        store.create("run: [unclosed", "run-y")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        store.create("- a list", "run-z")
    with pytest.raises(RunNotFoundError, match="'nope' does not exist"):
        store.get("nope")

    before = store.get("run-a")
    after = store.update("run-a", status="running", iteration=2, policy_version=7)
    assert (after.status, after.iteration, after.policy_version) == ("running", 2, 7)
    assert after.updated_at >= before.updated_at and after.created_at == before.created_at
    with pytest.raises(ValueError, match="cannot update run field"):
        store.update("run-a", itteration=3)
    with pytest.raises(ValueError, match="unknown run status"):
        store.update("run-a", status="done")

    resumed = store.ensure("run-a", "run: {iterations: 99}\n")
    assert resumed.iteration == 2 and resumed.config_path.read_text() == RUN_YAML, "ensure keeps an existing run"
    fresh = store.ensure("run-new", RUN_YAML)
    assert fresh.status == "pending"


def test_metrics_survive_a_torn_line_and_non_finite_values(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.create(RUN_YAML, "r1")
    store.append_metrics("r1", {"iteration": 1, "loss": np.float32(0.5), "kl": float("nan")})
    store.append_metrics("r1", {"iteration": 2, "loss": 0.25})
    with (store.path("r1") / "metrics.jsonl").open("a") as fh:
        fh.write('{"iteration": 3, "lo')  # a crash mid-write
    assert store.metrics("r1") == [{"iteration": 1, "loss": 0.5, "kl": None}, {"iteration": 2, "loss": 0.25}]
    store.append_metrics("r1", {"iteration": 3, "loss": 0.125})
    assert [m["iteration"] for m in store.metrics("r1")] == [1, 2, 3], "the next record starts on a fresh line"


def test_a_running_run_whose_process_is_gone_is_failed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.create(RUN_YAML, "dead")
    store.create(RUN_YAML, "alive")
    store.create(RUN_YAML, "halting")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.update("dead", status="running", pid=gone.pid)
    store.update("alive", status="running", pid=os.getpid())
    store.update("halting", status="stopping", pid=gone.pid)

    dead = store.get("dead")
    assert (dead.status, dead.error, dead.pid) == ("failed", DIED_ERROR, None)
    assert not (store.path("dead") / "pid").exists()
    assert store.get("dead").status == "failed", "the failure is recorded, not just reported"
    assert (store.get("alive").status, store.get("alive").pid) == ("running", os.getpid())
    assert store.get("halting").status == "stopped"


def test_start_and_stop_a_real_learner_process(tmp_path: Path, cleanup: list[LearnerLauncher]) -> None:
    launcher = _launcher(tmp_path)
    cleanup.append(launcher)
    store = launcher.store
    store.create(RUN_YAML, "r1")
    started = launcher.start("r1")
    assert started.status == "running" and started.pid is not None and is_running(started.pid)
    assert (store.path("r1") / "pid").read_text().strip() == str(started.pid)
    pid = started.pid
    wait_until(lambda: len(store.metrics("r1")) >= 2, 30, "learner metrics", alive=lambda: is_running(pid))
    with pytest.raises(RunExistsError, match="already running"):
        launcher.start("r1")

    stopped = launcher.stop("r1", timeout=20)
    assert stopped.status == "stopped" and stopped.pid is None
    assert not is_running(pid)
    log_text = (store.path("r1") / "train.log").read_text()
    assert "learner up" in log_text and "got SIGTERM" in log_text, "it stopped at its safe point"
    assert store.get("r1").iteration >= 2
    with pytest.raises(ValueError, match="is not running"):
        launcher.stop("r1")


def test_a_learner_ignoring_sigterm_is_killed(tmp_path: Path, cleanup: list[LearnerLauncher]) -> None:
    launcher = _launcher(tmp_path, STUBBORN_LEARNER)
    cleanup.append(launcher)
    store = launcher.store
    store.create(RUN_YAML, "r1")
    pid = launcher.start("r1").pid
    assert pid is not None
    wait_until(lambda: "ignoring SIGTERM" in (store.path("r1") / "train.log").read_text(), 30, "learner up")
    stopped = launcher.stop("r1", timeout=0.3)
    assert stopped.status == "stopped" and not is_running(pid)


# -- the HTTP API ---------------------------------------------------------------------------------------
def test_runs_through_the_api(tmp_path: Path) -> None:
    client = _client(tmp_path)
    created = client.post("/runs", json={"config": RUN_YAML, "run_id": "r1", "start": False}, headers=AUTH)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "pending" and created.json()["iterations"] == 5

    as_object = client.post(
        "/runs", json={"config": {"run": {"iterations": 3}}, "run_id": "r2", "start": False}, headers=AUTH
    )
    assert as_object.status_code == 201
    assert yaml.safe_load((tmp_path / "runs" / "r2" / "config.yaml").read_text()) == {"run": {"iterations": 3}}
    assert [r["run_id"] for r in client.get("/runs").json()] == ["r2", "r1"]

    store = RunStore(tmp_path / "runs")  # what the learner does
    store.append_metrics("r1", {"iteration": 1, "imagined_success_rate": 0.25, "loss": 0.9})
    store.update("r1", iteration=1, policy_version=4)
    run = client.get("/runs/r1").json()
    assert (run["iteration"], run["policy_version"]) == (1, 4)
    assert run["last_metrics"] == {"iteration": 1, "imagined_success_rate": 0.25, "loss": 0.9}
    assert client.get("/runs/r1/metrics").json() == [run["last_metrics"]]
    assert client.get("/runs/r2").json()["last_metrics"] is None


def test_bad_requests_say_what_to_fix(tmp_path: Path) -> None:
    client = _client(tmp_path)
    client.post("/runs", json={"config": RUN_YAML, "run_id": "r1", "start": False}, headers=AUTH)

    def post(body: object) -> Any:  # the test client's response type
        return client.post("/runs", json=body, headers=AUTH)

    cases: list[tuple[Any, int, str]] = [
        (client.get("/runs/nope"), 404, "run 'nope' does not exist"),
        (client.get("/runs/nope/metrics"), 404, "does not exist"),
        (client.get("/runs/Bad!Id"), 422, "invalid run id"),
        (post({"config": RUN_YAML, "run_id": "Bad Id"}), 422, "invalid run id"),
        (post({"config": RUN_YAML, "run_id": "r1", "start": False}), 409, "exists already"),
        (post({"config": "run: [unclosed", "run_id": "r3"}), 400, "not valid YAML"),
        (post({"config": "just text", "run_id": "r3"}), 400, "must be a YAML mapping"),
        (post({"run_id": "r3"}), 422, "body.config: Field required"),
        (client.post("/runs/r1/stop", headers=AUTH), 409, "is not running (status pending)"),
        (client.post("/runs/nope/stop", headers=AUTH), 404, "does not exist"),
        (client.get("/versions", params={"kind": "robot"}), 400, "unknown kind 'robot'"),
    ]
    for response, code, message in cases:
        assert response.status_code == code, (response.request.url, response.text)
        assert message in response.json()["detail"], response.json()


def test_post_endpoints_need_the_token(tmp_path: Path) -> None:
    client = _client(tmp_path)
    body = {"config": RUN_YAML, "run_id": "r1", "start": False}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        denied = client.post("/runs", json=body, headers=headers)
        assert denied.status_code == 401
        assert "Authorization: Bearer <token>" in denied.json()["detail"]
    assert client.post("/versions/policy/rollback", json={}).status_code == 401
    assert client.get("/runs").json() == [], "nothing was created"
    assert client.post("/runs", json=body, headers=AUTH).status_code == 201
    assert [r["run_id"] for r in client.get("/runs").json()] == ["r1"], "reads are open"

    open_client = _client(tmp_path, token=None)
    assert open_client.post("/runs", json={**body, "run_id": "r2"}).status_code == 201


def test_start_and_stop_through_the_api(tmp_path: Path, cleanup: list[LearnerLauncher]) -> None:
    launcher = _launcher(tmp_path)
    cleanup.append(launcher)
    client = _client(tmp_path, launcher=launcher)
    created = client.post("/runs", json={"config": RUN_YAML, "run_id": "r1"}, headers=AUTH).json()
    assert created["status"] == "running" and created["pid"] is not None
    pid = created["pid"]
    wait_until(lambda: client.get("/runs/r1").json()["iteration"] >= 1, 30, "first iteration")
    assert client.post("/runs/r1/start", headers=AUTH).status_code == 409

    stopping = client.post("/runs/r1/stop", headers=AUTH)
    assert stopping.status_code == 202 and stopping.json()["status"] in ("stopping", "stopped")
    wait_until(lambda: client.get("/runs/r1").json()["status"] == "stopped", 30, "stopped")
    wait_until(lambda: not is_running(pid), 30, "learner exit")  # it records "stopped", then exits
    assert "got SIGTERM" in client.get("/runs/r1/log").text

    crashing = _client(tmp_path, launcher=_launcher(tmp_path, CRASHING_LEARNER))
    crashing.post("/runs", json={"config": RUN_YAML, "run_id": "r2"}, headers=AUTH)
    wait_until(lambda: crashing.get("/runs/r2").json()["status"] == "failed", 30, "crash noticed")
    assert crashing.get("/runs/r2").json()["error"] == DIED_ERROR
    assert "config is broken" in crashing.get("/runs/r2/log").text


def test_promote_and_rollback_move_aliases(tmp_path: Path, redis_url: str) -> None:
    registry = Registry(tmp_path / "registry", "policy")
    for i in (1, 2, 3):
        registry.publish(_checkpoint(tmp_path / f"ckpt{i}", f"weights {i}"), {"note": f"v{i}"})
    client = _client(tmp_path, redis_url=redis_url)

    listed = client.get("/versions", params={"kind": "policy"}).json()
    assert [v["version"] for v in listed["versions"]] == [1, 2, 3]
    assert listed["aliases"] == {"latest": 3} and listed["versions"][2]["aliases"] == ["latest"]
    assert listed["versions"][0]["metadata"] == {"note": "v1"} and "path" not in listed["versions"][0]
    assert client.get("/versions", params={"kind": "worldmodel"}).json()["versions"] == []

    promoted = client.post("/versions/policy/promote", json={"version": 1}, headers=AUTH)
    assert promoted.json() == {"kind": "policy", "alias": "stable", "version": 1, "notified": True}
    client.post("/versions/policy/promote", json={"version": "latest", "alias": "stable"}, headers=AUTH)
    assert registry.aliases()["stable"] == 3
    mirror = redis.Redis.from_url(redis_url)
    assert mirror.hget("wmpo:registry:policy:aliases", "stable") == b"3", "services were told through Redis"

    rolled = client.post("/versions/policy/rollback", json={"alias": "stable"}, headers=AUTH)
    assert rolled.status_code == 200 and rolled.json()["version"] == 1
    assert registry.aliases() == {"latest": 3, "stable": 1}
    assert mirror.hget("wmpo:registry:policy:aliases", "stable") == b"1"
    mirror.close()

    errors = [
        (client.post("/versions/policy/promote", json={"version": 9}, headers=AUTH), 404, "version 9 does not exist"),
        (client.post("/versions/policy/promote", json={"version": "beta"}, headers=AUTH), 404, "alias 'beta'"),
        (client.post("/versions/policy/promote", json={"version": 1, "alias": "7"}, headers=AUTH), 400, "numeric"),
        (client.post("/versions/policy/rollback", json={"alias": "stable"}, headers=AUTH), 409, "no earlier version"),
        (client.post("/versions/robot/rollback", json={}, headers=AUTH), 400, "unknown kind"),
    ]
    for response, code, message in errors:
        assert response.status_code == code, response.text
        assert message in response.json()["detail"]


def test_metrics_endpoint_exports_runs_and_versions(tmp_path: Path) -> None:
    Registry(tmp_path / "registry", "reward").publish(_checkpoint(tmp_path / "ckpt", "w"))
    client = _client(tmp_path)
    client.post("/runs", json={"config": RUN_YAML, "run_id": "r1", "start": False}, headers=AUTH)
    client.post("/runs", json={"config": RUN_YAML, "run_id": "r2", "start": False}, headers=AUTH)
    RunStore(tmp_path / "runs").update("r2", status="running", iteration=3, pid=os.getpid())

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("wmpo_trainer_runs", (("status", "pending"),))] == 1
    assert samples[("wmpo_trainer_runs", (("status", "running"),))] == 1
    assert samples[("wmpo_trainer_run_iteration", (("run_id", "r2"),))] == 3
    assert ("wmpo_trainer_run_iteration", (("run_id", "r1"),)) not in samples
    assert samples[("wmpo_registry_alias_version", (("alias", "latest"), ("kind", "reward")))] == 1
    assert samples[("wmpo_registry_versions", (("kind", "policy"),))] == 0
    assert any(name == "wmpo_trainer_api_requests_total" for name, _ in samples)


def test_healthz_reports_redis(tmp_path: Path, redis_url: str) -> None:
    up = _client(tmp_path, redis_url=redis_url).get("/healthz")
    assert up.status_code == 200 and up.json() == {"status": "ok", "redis": "ok"}
    down = _client(tmp_path, redis_url=f"redis://:pw@127.0.0.1:{free_port()}/0").get("/healthz")
    assert down.status_code == 503
    assert down.json()["status"] == "unavailable" and "is unreachable" in down.json()["detail"]
    assert "pw" not in down.json()["detail"], "the password is not echoed"
    assert _client(tmp_path, redis_url="").get("/healthz").json() == {"status": "ok"}


def test_videos_are_served_and_path_traversal_refused(tmp_path: Path) -> None:
    client = _client(tmp_path)
    client.post("/runs", json={"config": RUN_YAML, "run_id": "r1", "start": False}, headers=AUTH)
    videos = tmp_path / "runs" / "r1" / "videos"
    frames = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    write_gif(frames, videos / "it0001-g00-e00.gif")
    (tmp_path / "secret.gif").write_bytes(b"GIF89a secret")
    (videos / "evil.gif").symlink_to(tmp_path / "secret.gif")

    assert client.get("/runs/r1/videos").json() == ["it0001-g00-e00.gif"]
    gif = client.get("/runs/r1/videos/it0001-g00-e00.gif")
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert gif.content == (videos / "it0001-g00-e00.gif").read_bytes()
    for name, code in [
        ("..%2Fconfig.yaml", 404),
        ("..%2F..%2Fsecret.gif", 404),
        ("config.yaml", 400),
        (".hidden.gif", 400),
        ("evil.gif", 400),
        ("missing.gif", 404),
    ]:
        response = client.get(f"/runs/r1/videos/{name}")
        assert response.status_code == code, (name, response.text)
        assert b"secret" not in response.content and b"trainer:" not in response.content
    store = RunStore(tmp_path / "runs")  # names that HTTP clients would normalise away
    for name in ("..", "../config.yaml", "../../secret.gif", "/etc/passwd"):
        with pytest.raises(ValueError, match="invalid video name"):
            store.video_path("r1", name)


def test_dashboard_renders_runs_plots_and_videos(tmp_path: Path) -> None:
    client = _client(tmp_path)
    client.post("/runs", json={"config": RUN_YAML, "run_id": "r1", "start": False}, headers=AUTH)
    store = RunStore(tmp_path / "runs")
    for it in (1, 2, 3):
        store.append_metrics(
            "r1", {"iteration": it, "imagined_success_rate": it / 4, "loss": 1 / it, "timing": {"s": 2}}
        )
    write_gif(np.zeros((2, 8, 8, 3), np.uint8), store.path("r1") / "videos" / "it0003-g01-e02.gif")

    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'href="/runs/r1/view"' in index.text and "pending" in index.text
    assert "<script" not in index.text and "http" not in index.text.replace('"/', ""), "self-contained"
    view = client.get("/runs/r1/view")
    assert view.status_code == 200
    assert view.text.count("<svg") == 3 and "imagined_success_rate (last 0.75)" in view.text
    assert view.text.index("imagined_success_rate") < view.text.index("loss") < view.text.index("timing.s")
    assert 'src="/runs/r1/videos/it0003-g01-e02.gif"' in view.text
    assert client.get("/runs/nope/view").status_code == 404
    docs = client.get("/openapi.json").json()
    assert docs["info"]["title"] == "WMPO trainer control plane" and "/runs/{run_id}/stop" in docs["paths"]


def test_svg_plot_handles_flat_and_single_point_series() -> None:
    for xs, ys in (([1.0], [0.5]), ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]), ([0.0, 1.0], [0.0, 0.0])):
        svg = svg_plot(xs, ys, "m")
        assert svg.count("<svg") == 1 and "nan" not in svg.lower() and "inf" not in svg.lower()
    assert "no data" in svg_plot([], [], "m")
    both = svg_lines({"model": ([1, 8], [30.0, 25.0]), "copy last frame": ([1, 8], [33.0, 23.0])}, "PSNR")
    assert both.count("<polyline") == 2 and "copy last frame" in both and "model" in both


# -- the CLI --------------------------------------------------------------------------------------------
def test_wmpo_trainer_api_serves_over_http(tmp_path: Path, redis_url: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"# control plane\n{TOKEN}\n")
    port = free_port()
    argv = [sys.executable, "-m", "wmpo.common.cli", "trainer", "api", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--registry", str(tmp_path / "reg"), "--redis", redis_url]
    proc = subprocess.Popen([*argv, "--token-file", str(token_file)], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: port_is_open("127.0.0.1", port), 60, "trainer api", alive=lambda: proc.poll() is None)
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok", "redis": "ok"}
        base = f"http://127.0.0.1:{port}"
        body = {"config": RUN_YAML, "start": False}
        assert httpx.post(f"{base}/runs", json=body, timeout=10).status_code == 401
        assert httpx.post(f"{base}/runs", json=body, headers=AUTH, timeout=10).status_code == 201
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in stderr, "the URL is logged"

    missing = subprocess.run(
        [*argv, "--token-file", str(tmp_path / "absent")], capture_output=True, text=True, timeout=60, check=False
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("wmpo: error: cannot read auth tokens file")
