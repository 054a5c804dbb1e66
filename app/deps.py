"""Typed request dependencies on what the application holds: settings, database and sessions, revocations,
generations.

Each reads the app's `AppState` through its one accessor (no dependency hop in between: `get_db` is on
every request's path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import ClientDisconnect

from app.config import Settings
from app.db import Database
from app.errors import BadRequest
from app.services.imports import ImportGate
from app.services.revocation import RevocationStore
from app.state import app_state
from app.streaming import GenerationRegistry, N8nStreamer
from app.uploads import UPLOAD_INTERRUPTED, UploadSlots


async def get_app_settings(request: Request) -> Settings:
    return app_state(request.app).settings


async def get_db(request: Request) -> Database:
    """async: a plain `def` dependency costs a thread-pool hop on every request."""
    return app_state(request.app).db


async def get_revocations(request: Request) -> RevocationStore:
    return app_state(request.app).revocations


async def get_generations(request: Request) -> GenerationRegistry:
    return app_state(request.app).generations


async def get_streamer(request: Request) -> N8nStreamer:
    """The app's one n8n client (pooled connections), for calls outside a generation (the connection test)."""
    return app_state(request.app).generations.streamer


async def get_upload_slots(request: Request) -> UploadSlots:
    return app_state(request.app).uploads


async def get_import_gate(request: Request) -> ImportGate:
    return app_state(request.app).imports


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
DatabaseDep = Annotated[Database, Depends(get_db)]
RevocationsDep = Annotated[RevocationStore, Depends(get_revocations)]
GenerationsDep = Annotated[GenerationRegistry, Depends(get_generations)]
StreamerDep = Annotated[N8nStreamer, Depends(get_streamer)]
UploadSlotsDep = Annotated[UploadSlots, Depends(get_upload_slots)]
ImportGateDep = Annotated[ImportGate, Depends(get_import_gate)]


async def get_session(db: DatabaseDep) -> AsyncIterator[AsyncSession]:
    """One session per request. Services commit explicitly; nothing is committed after the response."""
    async with db.sessionmaker() as session:
        yield session


async def get_short_session(db: DatabaseDep) -> AsyncIterator[AsyncSession]:
    """A request session for the routes that answer with a stream (follow, the widget, `/v1`), closed as soon
    as the endpoint returns (see ShortSessionDep), so its connection is back in the pool before the stream. It
    is `current_caller`'s session too: every route taking `CurrentCaller` works in it (the file routes), so a
    request holds one connection, not a second beside the caller's."""
    async with db.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
#: scope="function": closed as soon as the endpoint returns, not when its (possibly hour-long) stream ends,
#: so an open stream keeps no session, identity map or loaded user alive.
ShortSessionDep = Annotated[AsyncSession, Depends(get_short_session, scope="function")]


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """An upload's body as it arrives (files, avatars); a client gone mid-upload is a plain 400, not an
    unhandled error."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise BadRequest(UPLOAD_INTERRUPTED) from None
