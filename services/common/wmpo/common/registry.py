"""The version registry: checkpoint directories published as monotonically numbered versions.

Layout under the registry root (a local directory or a shared volume)::

    <root>/<kind>/versions/000007/        the checkpoint files, copied in
    <root>/<kind>/versions/000007.json    {version, sha256, created_at, metadata}
    <root>/<kind>/aliases.json            {"latest": {"version": 7, "history": [5, 6]}, "stable": ...}

`kind` is ``policy`` or ``worldmodel``. Publishing copies the checkpoint into a temporary directory,
hashes it (sha256 over every file's relative path and bytes), and renames it into place under a file
lock, so version numbers never repeat and readers never see a partial version. Every publish moves the
``latest`` alias. With a Redis URL, publishes and alias moves are announced on the channel
``wmpo:registry:<kind>`` (JSON ``{"event", "version", "alias"}``) and mirrored in the hash
``wmpo:registry:<kind>:aliases``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_write_text, file_lock
from wmpo.common.training_state import TRAINING_DIR

LATEST = "latest"


class VersionNotFoundError(KeyError):
    """No version or alias of that name."""


class CorruptVersionError(Exception):
    """A version whose files no longer match the sha256 recorded when it was published."""


@dataclass(frozen=True)
class VersionInfo:
    """One published version."""

    version: int
    sha256: str
    created_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data


def directory_sha256(path: Path) -> str:
    """sha256 over the sorted relative paths and contents of every file below `path`."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def parse_registry_uri(uri: str | Path) -> Path:
    """``file:///path``, ``/path`` or a relative path -> the registry root directory."""
    text = str(uri)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        raise UserError(f"unsupported registry URI {text!r}: use a directory path or file:///path")
    return Path(text)


class Registry:
    """Versions of one kind of model (``policy`` or ``worldmodel``) under a registry root."""

    def __init__(self, root: str | Path, kind: str = "policy", redis_url: str | None = None) -> None:
        if kind not in ("policy", "worldmodel", "reward"):
            raise ValueError(f"unknown registry kind {kind!r}")
        self.kind = kind
        self.root = parse_registry_uri(root) / kind
        self.versions_dir = self.root / "versions"
        self.redis_url = redis_url
        self.channel = f"wmpo:registry:{kind}"

    # -- reading -------------------------------------------------------------------------------------
    def list(self) -> list[VersionInfo]:
        """Every published version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        infos = []
        for meta in sorted(self.versions_dir.glob("[0-9]*.json")):
            data = json.loads(meta.read_text())
            infos.append(VersionInfo(**data, path=str(meta.with_suffix(""))))
        return infos

    def aliases(self) -> dict[str, int]:
        """Alias -> version."""
        return {name: entry["version"] for name, entry in self._read_aliases().items()}

    def resolve(self, ref: str | int) -> int:
        """A version number from a number, a numeric string or an alias; `VersionNotFoundError` otherwise."""
        text = str(ref).strip()
        if not text:
            text = LATEST
        if text.isdigit():
            version = int(text)
            if not (self.versions_dir / f"{version:06d}.json").is_file():
                raise VersionNotFoundError(f"{self.kind} version {version} does not exist")
            return version
        aliases = self.aliases()
        if text not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise VersionNotFoundError(f"{self.kind} alias {text!r} does not exist (aliases: {known})")
        return aliases[text]

    def get(self, ref: str | int) -> VersionInfo:
        """The `VersionInfo` of a version number or alias."""
        version = self.resolve(ref)
        meta = self.versions_dir / f"{version:06d}.json"
        return VersionInfo(**json.loads(meta.read_text()), path=str(meta.with_suffix("")))

    def verify(self, ref: str | int) -> VersionInfo:
        """`get`, then recompute the sha256; `CorruptVersionError` when the files changed since publishing."""
        info = self.get(ref)
        actual = directory_sha256(Path(info.path))
        if actual != info.sha256:
            raise CorruptVersionError(
                f"{self.kind} version {info.version} failed its sha256 check (recorded {info.sha256[:12]}…, "
                f"found {actual[:12]}…)"
            )
        return info

    # -- writing -------------------------------------------------------------------------------------
    def publish(
        self, checkpoint: str | Path, metadata: dict[str, str] | None = None, exclude: tuple[str, ...] = (TRAINING_DIR,)
    ) -> VersionInfo:
        """Copy `checkpoint` (less the `exclude` names: training state) in as the next version; move ``latest``."""
        source = Path(checkpoint)
        if not source.is_dir():
            raise UserError(f"cannot publish {source}: not a directory")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.versions_dir))
        try:
            content = staging / "content"
            shutil.copytree(source, content, ignore=shutil.ignore_patterns(*exclude))
            sha = directory_sha256(content)
            with self._lock():
                existing = [int(p.stem) for p in self.versions_dir.glob("[0-9]*.json")]
                version = max(existing, default=0) + 1
                final = self.versions_dir / f"{version:06d}"
                content.rename(final)
                info = VersionInfo(
                    version, sha, time.time(), {k: str(v) for k, v in (metadata or {}).items()}, str(final)
                )
                atomic_write_text(final.with_suffix(".json"), json.dumps(info.to_json(), indent=2, sort_keys=True))
                self._move_alias_locked(LATEST, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._notify({"event": "published", "version": info.version, "alias": LATEST})
        return info

    def set_alias(self, alias: str, ref: str | int) -> int:
        """Point `alias` at a version (promote); returns the version."""
        if not alias or alias.isdigit():
            raise UserError(f"alias names must not be empty or numeric, got {alias!r}")
        version = self.resolve(ref)
        with self._lock():
            self._move_alias_locked(alias, version)
        self._notify({"event": "alias", "version": version, "alias": alias})
        return version

    def rollback(self, alias: str) -> int:
        """Point `alias` back at the version it pointed to before its last move; returns that version."""
        with self._lock():
            aliases = self._read_aliases()
            entry = aliases.get(alias)
            if entry is None or not entry["history"]:
                raise UserError(f"alias {alias!r} has no earlier version to roll back to")
            previous = entry["history"].pop()
            entry["version"] = previous
            atomic_write_text(self.root / "aliases.json", json.dumps(aliases, indent=2, sort_keys=True))
        self._notify({"event": "alias", "version": previous, "alias": alias})
        return int(previous)

    def _move_alias_locked(self, alias: str, version: int) -> None:
        aliases = self._read_aliases()
        entry = aliases.setdefault(alias, {"version": version, "history": []})
        if entry["version"] != version:
            entry["history"] = [*entry["history"], entry["version"]][-50:]
            entry["version"] = version
        atomic_write_text(self.root / "aliases.json", json.dumps(aliases, indent=2, sort_keys=True))

    def _read_aliases(self) -> dict[str, dict[str, Any]]:
        path = self.root / "aliases.json"
        if not path.is_file():
            return {}
        data: dict[str, dict[str, Any]] = json.loads(path.read_text())
        return data

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root / ".lock")

    def _notify(self, event: dict[str, Any]) -> None:
        if not self.redis_url:
            return
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            client.hset(f"{self.channel}:aliases", mapping={k: str(v) for k, v in self.aliases().items()})
            client.publish(self.channel, json.dumps(event))
        finally:
            client.close()
