"""Rules of ARCHITECTURE.md that code can check: who may import whom, and the robot client's weight."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "common": ROOT / "services/common/wmpo/common",
    "data": ROOT / "services/common/wmpo/data",
    "sim": ROOT / "services/common/wmpo/sim",
    "robot": ROOT / "services/policy/wmpo/robot",
    "policy": ROOT / "services/policy/wmpo/policy",
    "worldmodel": ROOT / "services/worldmodel/wmpo/worldmodel",
    "trainer": ROOT / "services/trainer/wmpo/trainer",
}
# Which wmpo packages each package may import (wmpo.v1, the generated API, is allowed everywhere).
ALLOWED = {
    "common": {"common"},
    "data": {"common", "data"},
    "sim": {"common", "data", "sim", "robot"},
    "robot": {"common", "robot"},
    "policy": {"common", "data", "policy", "robot"},
    "worldmodel": {"common", "data", "worldmodel"},
    "trainer": {"common", "data", "sim", "trainer", "policy", "worldmodel", "robot"},
}


def _wmpo_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "wmpo" and len(parts) > 1 and parts[1] != "v1":
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_import_direction(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(bad)
        for path in PACKAGES[package].rglob("*.py")
        if (bad := _wmpo_imports(path) - ALLOWED[package])
    }
    assert not offenders, f"wmpo.{package} imports packages it must not: {offenders}"


def test_robot_client_imports_with_only_grpcio_protobuf_numpy(tmp_path: Path) -> None:
    """A real venv with only grpcio, protobuf and numpy (and their own dependencies) can use the client."""
    from importlib import metadata

    venv = tmp_path / "robot-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    pins = [f"{name}=={metadata.version(name)}" for name in ("grpcio", "protobuf", "numpy")]
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    # The wmpo sources on the path, as an installed wheel would put them (no extras, no dependencies).
    site = next((venv / "lib").glob("python3*/site-packages"))
    roots = [ROOT / "proto", ROOT / "services/common", ROOT / "services/policy"]
    (site / "wmpo-src.pth").write_text("\n".join(map(str, roots)) + "\n")
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from wmpo.robot import PolicyClient, make_observation
        obs = make_observation({"main": np.zeros((8, 8, 3), np.uint8)}, "press the button", [0.1, 0.2])
        assert obs.images["main"].height == 8
        PolicyClient("grpc://127.0.0.1:1").close()
        heavy = sorted(m for m in ("torch", "transformers", "diffusers", "pydantic", "PIL", "redis", "typer",
                                    "yaml", "structlog", "prometheus_client") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
        """
    )
    env = {"PATH": os.environ.get("PATH", "")}
    result = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    probe = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, check=False)
    assert probe.returncode != 0, "the robot venv must not have torch"
