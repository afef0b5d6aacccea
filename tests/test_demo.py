"""`wmpo demo --quick` end to end: real simulator, real stack, tiny everything; then a cached re-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wmpo.common.net import port_free
from wmpo.common.process import is_running

WMPO = [sys.executable, "-m", "wmpo.common.cli"]
pytestmark = [pytest.mark.triton, pytest.mark.redis]


def test_quick_demo_writes_a_consistent_report_and_leaves_nothing_running(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "report"
    cmd = [*WMPO, "demo", "--quick", "--work", str(work), "--out", str(out)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "WMPO demo (quick, task reach)" in done.stderr

    report = json.loads((out / "report.json").read_text())
    base, final = report["eval"]["base"], report["eval"]["final"]
    for e in (base, final):
        assert e["episodes"] == 4 and 0 <= e["ci95_low"] <= e["success_rate"] <= e["ci95_high"] <= 1
        assert e["successes"] == round(e["success_rate"] * e["episodes"])
        assert all(seed >= 1_000_000 for seed in e["seeds"])  # held-out evaluation seeds
    run = report["wmpo"]
    assert base["version"] == run["base_version"] == 1 and final["version"] == run["final_version"] >= 1
    assert [r["iteration"] for r in run["iterations"]] == [1, 2] and run["episodes"] == 16
    assert sum(r["episodes"] for r in run["iterations"]) == 16
    assert run["alignments"] == 1 and run["iterations"][0]["align_real_rollouts"] == 2
    for which in ("base", "final"):
        fidelity = report["fidelity"][which]
        assert fidelity["episodes"] >= 1 and "1" in fidelity["model"] and "1" in fidelity["copy_last_frame"]
    assert report["fidelity"]["final"]["world_model_version"] == 2  # the aligned world model
    for folder in ("fidelity-base", "fidelity-final", "imagined", "eval-base", "eval-final"):
        assert report["videos"][folder], folder
        assert all((out / rel).is_file() for rel in report["videos"][folder])
    page = (out / "index.html").read_text()
    assert page.count("<svg") >= 9 and "data:image/gif;base64," in page and "<script" not in page
    assert f"{base['success_rate']:.0%}" in page

    # the stack is down: no process alive, no port taken
    stack = json.loads((work / "stack" / "stack.json").read_text())
    assert {s["name"] for s in stack["services"]} == {"redis", "dream", "policy", "worker-0", "api"}
    for service in stack["services"]:
        assert not (service.get("pid") and is_running(int(service["pid"]))), service
    busy = {name: port for name, port in stack["ports"].items() if not port_free("127.0.0.1", int(port))}
    assert not busy and "left behind" not in done.stderr, busy

    # a second run resumes from the cache: every stage cached, no stack, same numbers
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("(cached)") == 9 and "bring the local stack up" not in again.stderr
    assert json.loads((out / "report.json").read_text())["eval"] == report["eval"]
