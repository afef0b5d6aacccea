"""What the control plane's routes share: the settings, the run store and launcher, bearer auth, the registries.

`create_app` puts one `ControlPlane` on ``app.state.control``; routes receive it as a `Control` parameter and
guard mutating endpoints with ``dependencies=[AUTH]``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from wmpo.common.registry import Registry
from wmpo.trainer.connections import open_registry
from wmpo.trainer.control.launcher import LearnerLauncher
from wmpo.trainer.control.runs import RunStore
from wmpo.trainer.settings import TrainerSettings

KINDS = ("policy", "worldmodel", "reward")
BEARER = HTTPBearer(auto_error=False, description="The token in the server's api_token_file.")


@dataclass(frozen=True)
class ControlPlane:
    """The state every route works on."""

    settings: TrainerSettings
    token: str | None
    """The bearer token POST endpoints need (None: no auth)."""
    store: RunStore
    launcher: LearnerLauncher
    stop_timeout: float
    """Seconds a stopping learner gets before its process group is killed."""

    @property
    def redis_url(self) -> str | None:
        return self.settings.redis_url or None

    def registry(self, kind: str, *, notify: bool = False) -> Registry:
        """The `kind` registry (400 for an unknown kind); `notify` announces alias moves on Redis."""
        if kind not in KINDS:
            raise HTTPException(400, detail=f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
        return open_registry(self.settings, kind, notify=notify)

    def registries(self) -> list[Registry]:
        """Every kind's registry, for reading."""
        return [self.registry(kind) for kind in KINDS]


def control_plane(request: Request) -> ControlPlane:
    """The app's `ControlPlane` (a FastAPI dependency)."""
    control: ControlPlane = request.app.state.control
    return control


Control = Annotated[ControlPlane, Depends(control_plane)]


def authorize(control: Control, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (when the server has a token)."""
    if control.token is None:
        return
    given = credentials.credentials.strip().encode() if credentials is not None else b""
    if credentials is None or not hmac.compare_digest(given, control.token.encode()):
        raise HTTPException(
            401,
            detail="missing or invalid bearer token: send the header 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


AUTH = Depends(authorize)
"""``dependencies=[AUTH]`` on every mutating endpoint."""
