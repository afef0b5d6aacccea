"""The version registry: numbering, aliases, sha256 verification, Redis notifications."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis

from wmpo.common.errors import UserError
from wmpo.common.registry import CorruptVersionError, Registry, VersionNotFoundError


def _checkpoint(path: Path, payload: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(payload)
    (path / "training").mkdir()
    (path / "training" / "state.pt").write_text("optimizer")
    return path


def test_publish_numbers_versions_and_moves_latest(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg", "policy")
    v1 = registry.publish(_checkpoint(tmp_path / "a", "one"), {"run": "r1"})
    v2 = registry.publish(_checkpoint(tmp_path / "b", "two"))
    assert (v1.version, v2.version) == (1, 2)
    assert registry.resolve("latest") == 2 and registry.resolve("") == 2 and registry.resolve("1") == 1
    assert registry.get(1).metadata == {"run": "r1"}
    assert not (Path(v1.path) / "training").exists(), "training state is not published"
    assert [v.version for v in registry.list()] == [1, 2]
    assert registry.verify("latest").sha256 == v2.sha256
    with pytest.raises(VersionNotFoundError, match="policy version 9 does not exist"):
        registry.resolve(9)
    with pytest.raises(VersionNotFoundError, match="alias 'stable' does not exist"):
        registry.resolve("stable")


def test_concurrent_publishes_never_share_a_number(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    sources = [_checkpoint(tmp_path / f"c{i}", str(i)) for i in range(8)]
    threads = [threading.Thread(target=registry.publish, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v.version for v in registry.list()) == list(range(1, 9))


def test_promote_and_rollback(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    for i in range(3):
        registry.publish(_checkpoint(tmp_path / f"c{i}", str(i)))
    registry.set_alias("stable", 1)
    registry.set_alias("stable", "latest")
    assert registry.aliases() == {"latest": 3, "stable": 3}
    assert registry.rollback("stable") == 1
    assert registry.rollback("latest") == 2
    with pytest.raises(UserError, match="no earlier version"):
        registry.rollback("stable")
    with pytest.raises(UserError, match="must not be empty or numeric"):
        registry.set_alias("7", 1)


def test_a_changed_version_fails_its_sha256(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    info = registry.publish(_checkpoint(tmp_path / "a", "weights"))
    (Path(info.path) / "weights.bin").write_text("tampered")
    with pytest.raises(CorruptVersionError, match="failed its sha256 check"):
        registry.verify(1)


@pytest.mark.redis
def test_publish_and_alias_moves_are_announced_on_redis(tmp_path: Path, redis_url: str) -> None:
    registry = Registry(tmp_path / "reg", "policy", redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(registry.channel)
    pubsub.get_message(timeout=1)
    registry.publish(_checkpoint(tmp_path / "a", "one"))
    registry.set_alias("stable", 1)
    events: list[dict[str, object]] = []
    while len(events) < 2:
        message = pubsub.get_message(timeout=5)
        assert message is not None, "no notification"
        events.append(json.loads(message["data"]))
    assert events == [
        {"event": "published", "version": 1, "alias": "latest"},
        {"event": "alias", "version": 1, "alias": "stable"},
    ]
    assert client.hgetall(f"{registry.channel}:aliases") == {b"latest": b"1", b"stable": b"1"}
