"""Which policy versions a server holds: a fixed checkpoint, or registry versions with hot swap.

Following an alias (``latest`` by default), a newly published version is verified (sha256) and loaded in
a background thread, then swapped in atomically; requests in flight keep the bundle they started with.
A version that fails its sha256 or fails to load is refused (remembered, logged, counted) and the
current version keeps serving. Pinned versions are loaded on demand and kept in a bounded LRU.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmpo.common.errors import UserError
from wmpo.common.logs import get_logger
from wmpo.common.metrics import counter, gauge
from wmpo.common.registry import CorruptVersionError, Registry, VersionInfo, VersionNotFoundError, directory_sha256
from wmpo.policy.checkpoint import PolicyBundle, load_policy

log = get_logger(__name__)
LOADED_VERSION = gauge("policy_current_version", "Policy version answering unpinned requests.")
REFUSED = counter("policy_refused_versions", "Versions refused (sha256 mismatch or load failure).")


class VersionUnavailableError(Exception):
    """The version exists but cannot be served (corrupt, failed to load, or not this server's checkpoint)."""


class NoModelError(Exception):
    """No version is loaded yet."""


@dataclass(frozen=True)
class Resident:
    version: int
    sha256: str
    bundle: PolicyBundle


class VersionManager:
    """Resolves version references to loaded `PolicyBundle`s."""

    def __init__(
        self,
        *,
        checkpoint: Path | None = None,
        registry: Registry | None = None,
        follow: str = "latest",
        device: str = "cpu",
        max_resident: int = 3,
        poll_interval_s: float = 1.0,
    ) -> None:
        if (checkpoint is None) == (registry is None):
            raise UserError("serve either --checkpoint DIR or --registry URI (exactly one)")
        self.checkpoint, self.registry, self.follow = checkpoint, registry, follow if registry else ""
        self.device, self.max_resident, self.poll_interval_s = device, max_resident, poll_interval_s
        self._lock = threading.Lock()
        self._load_locks: dict[int, threading.Lock] = {}
        self._resident: OrderedDict[int, Resident] = OrderedDict()
        self._current: Resident | None = None
        self.refused: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0

    # -- loading -------------------------------------------------------------------------------------
    def load_initial(self) -> None:
        """Load the checkpoint, or the version the followed alias points at (if any yet)."""
        if self.checkpoint is not None:
            bundle = load_policy(self.checkpoint, device=self.device)
            self._install(Resident(0, directory_sha256(self.checkpoint), bundle), make_current=True)
            return
        self.refresh()

    def refresh(self) -> bool:
        """Swap in the version the followed alias points at, if it changed; True when swapped."""
        if self.registry is None:
            return False
        try:
            target = self.registry.resolve(self.follow)
        except VersionNotFoundError:
            return False  # nothing published yet
        current = self._current.version if self._current else None
        if target == current or target in self.refused:
            return False
        try:
            resident = self._load(target)
        except VersionUnavailableError as exc:
            log.error("refusing policy version", version=target, reason=str(exc))
            return False
        self._install(resident, make_current=True)
        self.swaps += 1
        log.info("serving policy version", version=target, previous=current)
        return True

    def _load(self, version: int) -> Resident:
        with self._lock:
            if version in self._resident:
                self._resident.move_to_end(version)
                return self._resident[version]
            if version in self.refused:
                raise VersionUnavailableError(f"policy version {version} was refused: {self.refused[version]}")
            load_lock = self._load_locks.setdefault(version, threading.Lock())
        with load_lock:  # one load per version, whoever asks first
            with self._lock:
                if version in self._resident:
                    return self._resident[version]
            assert self.registry is not None
            try:
                info = self.registry.verify(version)
                bundle = load_policy(info.path, device=self.device)
            except (CorruptVersionError, UserError, OSError) as exc:
                reason = str(exc)
                with self._lock:
                    self.refused[version] = reason
                REFUSED.inc()
                raise VersionUnavailableError(f"policy version {version} cannot be served: {reason}") from None
            resident = Resident(version, info.sha256, bundle)
            self._install(resident, make_current=False)
            return resident

    def _install(self, resident: Resident, *, make_current: bool) -> None:
        with self._lock:
            self._resident[resident.version] = resident
            self._resident.move_to_end(resident.version)
            if make_current:
                self._current = resident
                LOADED_VERSION.set(resident.version)
            while len(self._resident) > self.max_resident:
                oldest = next(iter(self._resident))
                if self._current is not None and oldest == self._current.version:
                    self._resident.move_to_end(oldest)
                    oldest = next(iter(self._resident))
                del self._resident[oldest]

    # -- serving -------------------------------------------------------------------------------------
    def get(self, ref: str) -> Resident:
        """The resident answering `ref` ("" = current; a number or alias = exactly that version)."""
        ref = ref.strip()
        if not ref:
            current = self._current
            if current is None:
                raise NoModelError("no policy version is loaded yet")
            return current
        if not ref.isdigit() and not ref.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"version must be a number or an alias name, got {ref!r}")
        if self.registry is None:
            if ref == "0":
                return self.get("")
            raise VersionUnavailableError(
                f"this server serves the fixed checkpoint {self.checkpoint}; it cannot serve version {ref!r}"
            )
        return self._load(self.registry.resolve(ref))

    @property
    def current(self) -> Resident | None:
        return self._current

    def versions(self) -> list[tuple[VersionInfo, list[str], bool]]:
        """(info, aliases, resident) of every version this server can serve."""
        with self._lock:
            resident = set(self._resident)
        if self.registry is None:
            current = self._current
            if current is None:
                return []
            return [(VersionInfo(0, current.sha256, 0.0, {"checkpoint": str(self.checkpoint)}), [], True)]
        aliases: dict[int, list[str]] = {}
        for name, version in self.registry.aliases().items():
            aliases.setdefault(version, []).append(name)
        return [
            (info, sorted(aliases.get(info.version, [])), info.version in resident) for info in self.registry.list()
        ]

    # -- watching ------------------------------------------------------------------------------------
    def start_watching(self, redis_url: str | None = None) -> None:
        """Follow the alias in a background thread: Redis notifications when given, polling always."""
        if self.registry is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, args=(redis_url,), name="policy-version-watch", daemon=True)
        self._thread.start()

    def _watch(self, redis_url: str | None) -> None:
        pubsub: Any = None
        if redis_url:
            try:
                import redis

                pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
                assert self.registry is not None
                pubsub.subscribe(self.registry.channel)
            except Exception as exc:  # Redis down: polling still works
                log.warning("no registry notifications, polling only", error=str(exc))
                pubsub = None
        while not self._stop.is_set():
            if pubsub is not None:
                try:
                    pubsub.get_message(timeout=self.poll_interval_s)
                except Exception:
                    time.sleep(self.poll_interval_s)
            else:
                self._stop.wait(self.poll_interval_s)
            try:
                self.refresh()
            except Exception as exc:  # never let the watcher die
                log.error("version refresh failed", error=str(exc))
        if pubsub is not None:
            pubsub.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
