"""Helpers to run NVIDIA Triton through PyTriton (imported lazily: only world-model images have it).

PyTriton's Python-backend stub links against ``libpython3.X.so``; on interpreters whose libpython is
not in the system library path (pyenv, conda, uv-managed Pythons) the stub picks up another copy and
crashes with ``'_thread.RLock' object has no attribute '_recursion_count'``. `prepare_environment`
puts the running interpreter's LIBDIR first in ``LD_LIBRARY_PATH``; PyTriton copies ``os.environ``
when it launches the server, so calling it before `Triton.run()` fixes tests and services alike.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytriton.triton import Triton


def python_libdir() -> Path | None:
    """The running interpreter's LIBDIR when it holds a shared libpython, else None."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        return None
    path = Path(libdir)
    return path if any(path.glob("libpython3*.so*")) else None


def prepare_environment() -> None:
    """Put this interpreter's libpython directory first in ``LD_LIBRARY_PATH`` (idempotent)."""
    libdir = python_libdir()
    if libdir is None:
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if parts[:1] != [str(libdir)]:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), *(p for p in parts if p != str(libdir))])


@dataclass(frozen=True)
class TritonPorts:
    """The three KServe-v2 endpoints of one Triton server (8001/8000/8002 by default)."""

    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002
    host: str = "127.0.0.1"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics}/metrics"


def start_triton(
    bind_models: Callable[[Triton], Any],
    ports: TritonPorts,
    *,
    bind_address: str = "0.0.0.0",
    log_verbose: int = 0,
    exit_timeout_s: int = 10,
) -> Triton:
    """Start a Triton server in the background with the models `bind_models` binds; returns it.

    Stop it with ``triton.stop()``. Raises RuntimeError with Triton's reason if it cannot start.
    """
    prepare_environment()
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        grpc_port=ports.grpc,
        http_port=ports.http,
        metrics_port=ports.metrics,
        grpc_address=bind_address,
        http_address=bind_address,
        log_verbose=log_verbose,
        exit_timeout_secs=exit_timeout_s,
    )
    triton = Triton(config=config)
    try:
        bind_models(triton)
        triton.run()
    except Exception:
        triton.stop()
        raise
    return triton
