"""Episode files: one HDF5 file per episode, in robomimic's key layout, written atomically.

Layout of ``<root>/episodes/<episode_id>.hdf5`` (format ``wmpo-trajectory``, version 1)::

    /data                     attrs: format, format_version, total (= T)
    /data/demo_0              attrs: num_samples (= T), episode_id, task, instruction, source, seed,
                                     camera, success, first_success_step (-1: none), created_at, metadata (JSON)
    /data/demo_0/obs/<camera>_image   uint8   [T+1, H, W, C]   (robomimic stores T; we keep the final frame too)
    /data/demo_0/obs/proprio          float32 [T+1, P]
    /data/demo_0/actions              float32 [T, A]   in [-1, 1], gripper last
    /data/demo_0/rewards              float32 [T]      1.0 after a step that solved the task (sparse)
    /data/demo_0/dones                uint8   [T]      1 on the last step
    /data/demo_0/success              uint8   [T]      the simulator's success flag after each step

Every dataset is stored with the Fletcher-32 checksum filter (and LZF compression), so flipped bytes are
detected on read. A file is written under a temporary name, fsynced, then renamed: readers never see
half-written episodes, and several writers (processes) can append to one dataset at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wmpo.data.episode import Episode, EpisodeInfo

FORMAT = "wmpo-trajectory"
FORMAT_VERSION = 1
EPISODES_DIR = "episodes"
SUFFIX = ".hdf5"


class CorruptEpisodeError(Exception):
    """An episode file that cannot be read whole: truncated, corrupted, or not in this format."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def new_episode_id() -> str:
    """Sortable by creation time and unique across processes: ``ep-<UTC time to the µs>-<random>``."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000_000))
    return f"ep-{stamp}.{now // 1000 % 1_000_000:06d}-{uuid.uuid4().hex[:8]}"


class EpisodeStore:
    """Read and write the episode files of one dataset folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.episodes_dir = self.root / EPISODES_DIR

    def paths(self) -> list[Path]:
        """Episode files, oldest first (ids sort by creation time)."""
        if not self.episodes_dir.is_dir():
            return []
        return sorted(p for p in self.episodes_dir.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))

    def write(self, episode: Episode) -> Path:
        """Validate and write `episode` atomically; assigns `episode.episode_id` if empty. Returns the file."""
        episode.validate()
        if not episode.episode_id:
            episode.episode_id = new_episode_id()
        self.episodes_dir.mkdir(parents=True, exist_ok=True)
        final = self.episodes_dir / f"{episode.episode_id}{SUFFIX}"
        if final.exists():
            raise FileExistsError(f"episode {episode.episode_id} already exists in {self.root}")
        tmp = self.episodes_dir / f".{episode.episode_id}.{os.getpid()}.tmp"
        try:
            with h5py.File(tmp, "w") as f:
                _write_h5(f, episode)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            tmp.rename(final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def read(self, path: Path) -> Episode:
        """Read and verify a whole episode (checksums, shapes); `CorruptEpisodeError` when it cannot."""
        with _reading(path) as demo:
            attrs = demo.attrs
            camera = str(attrs["camera"])
            episode = Episode(
                frames=demo["obs"][f"{camera}_image"][()],
                actions=demo["actions"][()],
                proprio=demo["obs"]["proprio"][()],
                step_success=demo["success"][()].astype(bool),
                instruction=str(attrs["instruction"]),
                task=str(attrs["task"]),
                source=str(attrs["source"]),
                seed=int(attrs["seed"]),
                camera=camera,
                episode_id=str(attrs["episode_id"]),
                metadata=json.loads(str(attrs.get("metadata", "{}"))),
            )
        try:
            episode.validate()
        except ValueError as exc:
            raise CorruptEpisodeError(path, f"inconsistent episode: {exc}") from None
        return episode

    def info(self, path: Path) -> EpisodeInfo:
        """Metadata and shapes of an episode, without reading its frames."""
        with _reading(path) as demo:
            attrs = demo.attrs
            camera = str(attrs["camera"])
            frames = demo["obs"][f"{camera}_image"]
            t = int(demo["actions"].shape[0])
            if frames.shape[0] != t + 1 or demo["success"].shape != (t,):
                raise CorruptEpisodeError(path, f"{frames.shape[0]} frames for {t} actions")
            first = int(attrs["first_success_step"])
            return EpisodeInfo(
                episode_id=str(attrs["episode_id"]),
                path=str(path),
                task=str(attrs["task"]),
                instruction=str(attrs["instruction"]),
                source=str(attrs["source"]),
                seed=int(attrs["seed"]),
                length=t,
                success=bool(attrs["success"]),
                first_success_step=None if first < 0 else first,
                image_shape=tuple(int(d) for d in frames.shape[1:]),  # type: ignore[arg-type]
                action_dim=int(demo["actions"].shape[1]),
                proprio_dim=int(demo["obs"]["proprio"].shape[1]),
            )


def _write_h5(f: h5py.File, ep: Episode) -> None:
    data = f.create_group("data")
    data.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "total": ep.length})
    demo = data.create_group("demo_0")
    first = ep.first_success_step
    demo.attrs.update(
        {
            "num_samples": ep.length,
            "episode_id": ep.episode_id,
            "task": ep.task,
            "instruction": ep.instruction,
            "source": ep.source,
            "seed": ep.seed,
            "camera": ep.camera,
            "success": ep.success,
            "first_success_step": -1 if first is None else first,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metadata": json.dumps(ep.metadata, sort_keys=True),
        }
    )
    opts: dict[str, Any] = {"fletcher32": True, "compression": "lzf"}
    obs = demo.create_group("obs")
    frame_chunks = (1, *ep.frames.shape[1:])
    obs.create_dataset(f"{ep.camera}_image", data=ep.frames, chunks=frame_chunks, **opts)
    obs.create_dataset("proprio", data=ep.proprio.astype(np.float32), **opts)
    demo.create_dataset("actions", data=ep.actions.astype(np.float32), **opts)
    success = ep.step_success.astype(np.uint8)
    demo.create_dataset("rewards", data=success.astype(np.float32), **opts)
    dones = np.zeros(ep.length, np.uint8)
    dones[-1] = 1
    demo.create_dataset("dones", data=dones, **opts)
    demo.create_dataset("success", data=success, **opts)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[h5py.Group]:
    """Open an episode file's demo group; any read failure inside becomes a `CorruptEpisodeError`."""
    try:
        with h5py.File(path, "r") as f:
            yield _demo(f, path)
    except CorruptEpisodeError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CorruptEpisodeError(path, _reason(exc)) from None


def _demo(f: h5py.File, path: Path) -> h5py.Group:
    data = f.get("data")
    if data is None or data.attrs.get("format") != FORMAT:
        raise CorruptEpisodeError(path, f"not a {FORMAT} file (no /data group with format={FORMAT!r})")
    version = int(data.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise CorruptEpisodeError(path, f"format version {version}; this wmpo reads version {FORMAT_VERSION}")
    demo = data.get("demo_0")
    if demo is None:
        raise CorruptEpisodeError(path, "no /data/demo_0 group")
    return demo


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "truncated file" in text or "file signature not found" in text:
        return f"truncated or not an HDF5 file ({text.split('(', maxsplit=1)[0].strip()})"
    if "filter returned failure" in text or "checksum" in text.lower():
        return "corrupted data (checksum mismatch)"
    if isinstance(exc, KeyError):
        return f"missing field {text}"
    return f"unreadable ({type(exc).__name__}: {text})"
