"""``/versions``: list the policy, world-model and reward-model versions; promote and roll back aliases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from wmpo.common.errors import UserError
from wmpo.common.logs import get_logger
from wmpo.common.registry import Registry
from wmpo.trainer.control.deps import AUTH, Control, ControlPlane

log = get_logger(__name__)
router = APIRouter(tags=["versions"])


class Promote(BaseModel):
    """Point an alias at a version."""

    version: str | int = Field(description="Version number or alias to promote.")
    alias: str = Field(default="stable", description="Alias to move.")


class Rollback(BaseModel):
    """Move an alias back to its previous version."""

    alias: str = Field(default="latest", description="Alias to move back.")


@router.get("/versions", summary="Published versions and aliases of one kind")
def list_versions(control: Control, kind: str = "policy") -> dict[str, Any]:
    reg = control.registry(kind)
    aliases = reg.aliases()
    versions = [
        {**info.to_json(), "aliases": sorted(a for a, v in aliases.items() if v == info.version)} for info in reg.list()
    ]
    return {"kind": kind, "aliases": aliases, "versions": versions}


@router.post("/versions/{kind}/promote", dependencies=[AUTH], summary="Point an alias at a version")
def promote(control: Control, kind: str, body: Promote) -> dict[str, Any]:
    return _move_alias(
        control, kind, body.alias, lambda reg: reg.set_alias(body.alias, body.version), 400, "alias moved"
    )


@router.post(
    "/versions/{kind}/rollback",
    dependencies=[AUTH],
    summary="Move an alias back to the version it pointed to before its last move",
)
def rollback(control: Control, kind: str, body: Rollback) -> dict[str, Any]:
    return _move_alias(control, kind, body.alias, lambda reg: reg.rollback(body.alias), 409, "alias rolled back")


def _move_alias(
    control: ControlPlane, kind: str, alias: str, move: Callable[[Registry], int], refused: int, event: str
) -> dict[str, Any]:
    """`move` the alias in the `kind` registry, telling the services through Redis (logged as `event`); a
    move the registry refuses is a `refused` error; one Redis could not announce still counts (services polling
    the registry follow)."""
    reg = control.registry(kind, notify=True)
    try:
        version = move(reg)
    except UserError as exc:
        raise HTTPException(refused, detail=str(exc)) from None
    except redis.RedisError as exc:
        version = reg.resolve(alias)
        log.warning("alias moved but Redis was not notified", kind=reg.kind, alias=alias, error=str(exc))
        warning = f"the alias moved, but Redis could not be notified ({exc}); services polling the registry follow"
        return {"kind": reg.kind, "alias": alias, "version": version, "notified": False, "warning": warning}
    log.info(event, kind=kind, alias=alias, version=version)
    return {"kind": kind, "alias": alias, "version": version, "notified": control.redis_url is not None}
