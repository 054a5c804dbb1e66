"""What one application instance holds, in one typed container (`AppState`) and its one accessor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from starlette.applications import Starlette

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from app.config import Settings
    from app.db import Database
    from app.ratelimit import RateLimiter
    from app.services.imports import ImportGate
    from app.services.revocation import RevocationStore
    from app.streaming import GenerationRegistry
    from app.uploads import UploadSlots


@dataclass(slots=True)
class AppState:
    """Built once by `create_app`; kept per application, so two apps (tests, workers) share nothing."""

    settings: Settings
    db: Database
    redis: Redis | None
    limiter: RateLimiter
    revocations: RevocationStore
    generations: GenerationRegistry
    uploads: UploadSlots
    imports: ImportGate
    migration_head: str | None


def app_state(app: Starlette) -> AppState:
    """The one read of `app.state`: everything else reaches the container through this (typed)."""
    state: AppState = app.state.container
    return state


async def get_app_state(request: Request) -> AppState:
    """async: a plain `def` dependency costs a thread-pool hop on every request."""
    return app_state(request.app)


StateDep = Annotated[AppState, Depends(get_app_state)]
