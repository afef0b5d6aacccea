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
    "sim": ROOT / "services/sim/wmpo/sim",
    "robot": ROOT / "services/robot/wmpo/robot",
    "policy": ROOT / "services/policy/wmpo/policy",
    "worldmodel": ROOT / "services/worldmodel/wmpo/worldmodel",
    "trainer": ROOT / "services/trainer/wmpo/trainer",
    "stack": ROOT / "services/stack/wmpo/stack",
    "demo": ROOT / "services/demo/wmpo/demo",
}
# Which wmpo packages each package may import (wmpo.v1, the generated API, is allowed everywhere).
# common imports no other wmpo package; stack only common (it runs the others as processes); the trainer
# neither stack nor demo; nothing imports demo. worldmodel may import sim (below it in DESIGN.md §2): the
# Imagination API starts sessions from simulator resets and audits them, importing wmpo.sim lazily.
ALLOWED = {
    "common": {"common"},
    "data": {"common", "data"},
    "sim": {"common", "data", "sim", "robot"},
    "robot": {"common", "robot"},
    "policy": {"common", "data", "policy", "robot"},
    "worldmodel": {"common", "data", "sim", "worldmodel"},
    "trainer": {"common", "data", "sim", "trainer", "policy", "worldmodel", "robot"},
    "stack": {"common", "stack"},
    "demo": {"common", "data", "sim", "robot", "policy", "worldmodel", "trainer", "stack", "demo"},
}


def test_every_package_folder_is_listed() -> None:
    """A package folder under services/ that the rules do not name would escape them."""
    found = {p.parent.name for p in ROOT.glob("services/*/wmpo/*/__init__.py")}
    assert found == set(PACKAGES), found ^ set(PACKAGES)
    for name, folder in PACKAGES.items():
        assert (folder / "__init__.py").is_file(), name


def test_every_subpackage_is_installed() -> None:
    """`pyproject.toml` lists every folder with an ``__init__.py`` (a non-editable install ships only those)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    for name, folder in PACKAGES.items():
        assert setup["package-dir"][f"wmpo.{name}"] == str(folder.relative_to(ROOT))
        for init in folder.rglob("__init__.py"):
            sub = ".".join(init.parent.relative_to(folder.parent).parts)
            assert f"wmpo.{sub}" in listed, f"wmpo.{sub} is missing from [tool.setuptools] packages"


def test_nothing_imports_the_demo() -> None:
    importers = {name for name, allowed in ALLOWED.items() if "demo" in allowed and name != "demo"}
    assert not importers
    for test in (ROOT / "bench").glob("*.py"):
        assert "demo" not in _wmpo_imports(test), test


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


def _module_name(path: Path) -> str:
    for folder in PACKAGES.values():
        if path.is_relative_to(folder):
            rel = path.relative_to(folder.parent).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            return "wmpo." + ".".join(parts)
    raise AssertionError(path)


def _top_level_imports(path: Path) -> set[str]:
    """wmpo modules imported when `path` is imported (not those imported inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("wmpo.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wmpo."):
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return found


def test_no_import_circles() -> None:
    """Neither packages nor modules import each other in a circle."""
    modules = {_module_name(p): p for folder in PACKAGES.values() for p in folder.rglob("*.py")}
    graph = {
        name: {m for m in _top_level_imports(path) if m in modules and m != name} for name, path in modules.items()
    }
    packages: dict[str, set[str]] = {name: set() for name in PACKAGES}
    for path in (p for folder in PACKAGES.values() for p in folder.rglob("*.py")):
        name = _module_name(path).split(".")[1]
        packages[name] |= _wmpo_imports(path) - {name}

    def cycle(edges: dict[str, set[str]]) -> list[str] | None:
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            stack.append(node)
            for nxt in sorted(edges.get(node, ())):
                if state.get(nxt) == 1:
                    return [*stack[stack.index(nxt) :], nxt]
                if nxt not in state and (found := visit(nxt)):
                    return found
            stack.pop()
            state[node] = 2
            return None

        for node in sorted(edges):
            if node not in state and (found := visit(node)):
                return found
        return None

    assert cycle(packages) is None, f"packages import each other in a circle: {cycle(packages)}"
    assert cycle(graph) is None, f"modules import each other in a circle: {cycle(graph)}"


def test_robot_client_imports_with_only_grpcio_protobuf_numpy(tmp_path: Path) -> None:
    """`pip install ./services/robot` into a fresh venv gives both clients with only grpcio, protobuf, numpy.

    The install runs from a copy of the three folders the package reads (services/robot, services/common,
    proto), so no stale build/ folder of the working tree can leak into the wheel, and none is left there.
    """
    import shutil

    tree = tmp_path / "repo"
    skip = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "dist")
    for folder in ("services/robot", "services/common/wmpo/common", "proto/wmpo/v1"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=skip)
    venv = tmp_path / "robot-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "./services/robot"],
        cwd=tree, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    code = textwrap.dedent(
        """
        import asyncio
        import importlib.util
        import sys
        from importlib import metadata

        import numpy as np
        from wmpo.robot import AsyncPolicyClient, ClientOptions, PolicyClient, make_observation

        obs = make_observation({"main": np.zeros((8, 8, 3), np.uint8)}, "press the button", [0.1, 0.2])
        assert obs.images["main"].height == 8
        PolicyClient("grpc://127.0.0.1:1", ClientOptions(timeout_s=1.0)).close()

        async def main() -> None:
            client = AsyncPolicyClient("grpcs://127.0.0.1:1", token="t")
            await client.close()

        asyncio.run(main())
        heavy = sorted(m for m in ("torch", "transformers", "diffusers", "pydantic", "PIL", "redis", "typer",
                                    "yaml", "structlog", "prometheus_client") if m in sys.modules)
        assert not heavy, heavy
        # only the client's own modules of wmpo.common are installed, and nothing beyond the three dependencies
        assert importlib.util.find_spec("wmpo.common.config") is None
        assert importlib.util.find_spec("wmpo.policy") is None
        names = {d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()}
        extra = names - {"wmpo-robot", "grpcio", "protobuf", "numpy", "typing-extensions", "pip", "setuptools"}
        assert not extra, extra
        print("ok")
        """
    )
    env = {"PATH": os.environ.get("PATH", "")}
    result = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    probe = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, check=False)
    assert probe.returncode != 0, "the robot venv must not have torch"
