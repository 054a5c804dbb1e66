"""Retention: rows worth nothing once old, deleted by the worker heartbeat's periodic sweep (docs/OPERATIONS.md).

- `error_logs`: ERROR_LOG_RETENTION_DAYS after they were written (0: kept for ever). Failed generations'
  diagnostics; the messages and the usage ledger keep what happened.
- `refresh_tokens`: a day past their expiry. An expired token is refused by its own `exp` before any lookup,
  so its row (and a spent one's reuse detection) serves nothing after that. Before that, a spent token's
  `successor_encrypted` (the live refresh token it was rotated into, under ENCRYPTION_KEY) is cleared once its
  reuse window (REFRESH_REUSE_GRACE_SECONDS) is over by SUCCESSOR_KEPT_AFTER_GRACE: it is never read after the
  window, and kept, it let anyone with that key and a copy of the database sign in as its user for days.
- `usage_daily`: days before yesterday. The quota counts today only; yesterday's row may still be given back
  by a send refused just after midnight (`usage.release_generation`).
- `invites`: INVITE_RETENTION_DAYS after they ended (expired, revoked, or used up: `used_up_at`, or the expiry
  for one used up before that column), 0 keeping them. An ended invite opens nothing; the admin's list keeps
  it that long with its status.
- `files` no message carries: UPLOAD_RETENTION_HOURS after their upload (0: kept for ever), so uploads never
  sent cannot store bytes at will. A send attaching one at the same moment is safe either way: the DELETE
  takes only rows it locked and re-checks `message_id IS NULL` on them, so a row a send has marked (or is
  marking: it holds the lock) is left, and a row the sweep took first leaves the send's conditional UPDATE
  one row short: 422, nothing stored (`files.attach`). Their bytes go with them when nothing else uses them.
- `file_blobs` no file and no share copy names: the bytes the deletions' own collection (`blobs.collect_blobs`)
  missed (a crash between the deletion's commit and the collection, data of older versions). Only blobs
  written (or claimed again by an upload) more than UNUSED_BLOB_MARGIN ago: see its comment. A sweep
  examines at most SWEEP_BATCH * SWEEP_MAX_BATCHES blobs, from a random point of the key (the sha256, its
  primary key) on, so the check stays cheap however many files the service holds; successive sweeps (and
  workers) cover the whole table. Being a backstop, it runs on one sweep in UNUSED_BLOBS_EVERY of a worker
  (the caller's `unused_blobs`), not on all: it examined its 10,000 blobs every 30 s per worker, mostly
  finding nothing.

Expired idempotency keys go with `idempotency.prune` and expired revocations whenever something is revoked.

Every worker of every instance sweeps (no leader to elect): each batch is one short transaction deleting (or
clearing) at most SWEEP_BATCH rows, oldest first, picked with FOR UPDATE SKIP LOCKED on PostgreSQL, so two
sweepers at once take different rows and never wait for (or deadlock with) each other or a request; SQLite,
one writer at a time, renders no locking clause. At most SWEEP_MAX_BATCHES batches per table and sweep: a
backlog (the first sweep after an upgrade) is worked off over several sweeps instead of delaying the heartbeat
that runs them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.config import Settings
from app.db import utcnow
from app.models import Base, ErrorLog, File, FileBlob, Invite, RefreshToken, ShareFile, UsageDaily
from app.services import blobs

logger = logging.getLogger(__name__)

#: Rows deleted per transaction, and batches per table and sweep (a sweep runs every 3 heartbeats).
SWEEP_BATCH = 1000
SWEEP_MAX_BATCHES = 10
#: How long a refresh token's row outlives its expiry: a margin for clocks that differ between instances.
REFRESH_KEPT_AFTER_EXPIRY = timedelta(days=1)
#: How long a spent refresh token's successor outlives its reuse window: clocks that differ between instances
#: (one whose clock is behind still hands it out a little longer; cleared, that refresh would revoke the family).
SUCCESSOR_KEPT_AFTER_GRACE = timedelta(minutes=1)
#: How old an unused blob must be to be swept. An upload writes (or claims, moving `created_at` to now) its blob
#: and its `files` row in one transaction, so no committed blob waits for its file; the margin keeps that true
#: for any writer that commits the bytes first, and covers clocks that differ between instances (`created_at`
#: is each instance's time). It also keeps the batch from failing on a reference: a blob claimed by an upload
#: that commits while the sweep's statement runs is read again when the sweep locks it, and is then too young.
#: An unused blob costs an hour more of storage at most.
UNUSED_BLOB_MARGIN = timedelta(hours=1)
#: A worker looks for unused blobs on its first sweep and then on one sweep in this many (every 5 minutes with
#: the default heartbeat): a backstop for the deletions' own collection, whose cost is the examination itself.
UNUSED_BLOBS_EVERY = 10


@dataclass(frozen=True, slots=True)
class Swept:
    """Rows deleted by one sweep, per table."""

    error_logs: int = 0
    refresh_tokens: int = 0
    usage_daily: int = 0
    invites: int = 0
    unsent_files: int = 0
    file_blobs: int = 0
    #: Spent refresh tokens whose successor was cleared (the rows stay, for reuse detection).
    refresh_successors: int = 0


async def _delete_batch(
    session: AsyncSession,
    model: type[Base],
    key: Sequence[InstrumentedAttribute[Any]],
    order: InstrumentedAttribute[Any],
    where: ColumnElement[bool],
    returning: InstrumentedAttribute[Any] | None = None,
    values: dict[str, Any] | None = None,
) -> list[Any]:
    """Delete at most SWEEP_BATCH rows of `model` matching `where`, oldest (`order`) first, and commit; `key` is
    its primary key (rows are picked by it). `where` is checked again by the DELETE on the rows it locked.
    Returns the deleted rows' `returning` (by default their key's first column): one per row. With `values`
    the rows are updated with them instead of deleted (the same picking, locks and re-check)."""
    batch = select(*key).where(where).order_by(order).limit(SWEEP_BATCH).with_for_update(skip_locked=True)
    # Picked by a statement of its own, not `IN (subquery)`: PostgreSQL may run that subquery again for each row
    # (a nested-loop semi-join), where the rows this DELETE removed no longer count against its LIMIT, so one
    # batch deleted every matching row in one transaction. The locks hold until the commit below.
    rows = (await session.execute(batch)).all()
    if not rows:
        await session.commit()
        return []
    picked = key[0].in_([row[0] for row in rows]) if len(key) == 1 else tuple_(*key).in_([tuple(row) for row in rows])
    change = delete(model) if values is None else update(model).values(values)
    statement = (
        change.where(picked, where)
        .returning(returning if returning is not None else key[0])
        .execution_options(synchronize_session=False)
    )
    changed = list((await session.execute(statement)).scalars())
    await session.commit()
    return changed


async def _delete_in_batches(
    session: AsyncSession,
    model: type[Base],
    key: Sequence[InstrumentedAttribute[Any]],
    order: InstrumentedAttribute[Any],
    where: ColumnElement[bool],
    values: dict[str, Any] | None = None,
) -> int:
    """`_delete_batch` until fewer than SWEEP_BATCH rows are left, at most SWEEP_MAX_BATCHES times."""
    deleted = 0
    for _ in range(SWEEP_MAX_BATCHES):
        count = len(await _delete_batch(session, model, key, order, where, values=values))
        deleted += count
        if count < SWEEP_BATCH:
            break
    return deleted


async def _clear_successors(session: AsyncSession, cutoff: datetime) -> int:
    """Clear the successor of refresh tokens spent before `cutoff`, in `_delete_in_batches`'s batches (updated,
    not deleted: the rows stay for reuse detection), picked by `ix_refresh_tokens_successor_used_at` (which
    holds only rows with a successor: the few spent within the last minutes), skipping rows a refresh holds."""
    stale = and_(RefreshToken.successor_encrypted.is_not(None), RefreshToken.used_at < cutoff)
    return await _delete_in_batches(
        session, RefreshToken, [RefreshToken.id], RefreshToken.used_at, stale, values={"successor_encrypted": None}
    )


def _unused_blob(window: ColumnElement[bool], cutoff: datetime) -> ColumnElement[bool]:
    """Blobs in `window` written before `cutoff` that no file and no share copy names."""
    return and_(
        window,
        FileBlob.created_at < cutoff,
        ~exists().where(File.sha256 == FileBlob.sha256),
        ~exists().where(ShareFile.sha256 == FileBlob.sha256),
    )


async def _delete_unused_blobs(session: AsyncSession, window: ColumnElement[bool], cutoff: datetime) -> int:
    """Delete the unused blobs of `window` (at most SWEEP_BATCH) in one transaction. A file or share copy that
    names one of them and commits while the DELETE runs (its snapshot misses it; the foreign key, which reads
    the latest rows, does not) fails the batch: the batch's unused blobs then go one by one, each in its own
    transaction, as the deletions' own collection does, and the one in use again stays."""
    unused = _unused_blob(window, cutoff)
    try:
        return len(await _delete_batch(session, FileBlob, [FileBlob.sha256], FileBlob.sha256, unused))
    except IntegrityError:
        await session.rollback()
    listed = select(FileBlob.sha256).where(unused).order_by(FileBlob.sha256).limit(SWEEP_BATCH)
    hashes = list((await session.execute(listed)).scalars())
    await session.rollback()
    return await blobs.collect_blobs(session, hashes)


async def _sweep_unsent_files(session: AsyncSession, cutoff: datetime, blob_cutoff: datetime) -> tuple[int, int]:
    """Delete the uploads no message carries that were uploaded before `cutoff`, in batches, then after each
    batch the bytes they used that nothing else uses. Returns (files, blobs) deleted."""
    unsent = and_(File.message_id.is_(None), File.created_at < cutoff)
    files = gone = 0
    for _ in range(SWEEP_MAX_BATCHES):
        hashes = await _delete_batch(session, File, [File.id], File.created_at, unsent, returning=File.sha256)
        files += len(hashes)
        if hashes:
            gone += await _delete_unused_blobs(session, FileBlob.sha256.in_(sorted(set(hashes))), blob_cutoff)
        if len(hashes) < SWEEP_BATCH:
            break
    return files, gone


async def _sweep_unused_blobs(session: AsyncSession, cutoff: datetime) -> int:
    """Delete unused blobs among at most SWEEP_MAX_BATCHES windows of SWEEP_BATCH blobs, in key order from a
    random key on, wrapping round to the first key: every blob is examined by some sweep, none sweeps them all."""
    start = secrets.token_hex(32)  # a random SHA-256, in the stored spelling (lower-case hex)
    deleted = batches = 0
    passes: tuple[tuple[ColumnElement[bool] | None, ColumnElement[bool] | None], ...] = (
        (FileBlob.sha256 >= start, None),
        (None, FileBlob.sha256 < start),
    )
    for lower, upper in passes:
        while batches < SWEEP_MAX_BATCHES:
            batches += 1
            bounds = [bound for bound in (lower, upper) if bound is not None]
            nth = select(FileBlob.sha256).where(*bounds).order_by(FileBlob.sha256).offset(SWEEP_BATCH - 1).limit(1)
            last = await session.scalar(nth)
            if last is not None:
                bounds.append(FileBlob.sha256 <= last)
            deleted += await _delete_unused_blobs(session, and_(*bounds), cutoff)
            if last is None:
                break
            lower = FileBlob.sha256 > last
    return deleted


async def sweep(*, session: AsyncSession, settings: Settings, unused_blobs: bool = True) -> Swept:
    """Delete what the retention rules say has expired (at most SWEEP_MAX_BATCHES batches per table). Commits.
    `unused_blobs` False skips the examination of blobs nothing names (the bytes of the unsent uploads it
    deletes still go): the worker asks for it on one sweep in UNUSED_BLOBS_EVERY."""
    now = utcnow()
    error_logs = 0
    if settings.ERROR_LOG_RETENTION_DAYS > 0:
        cutoff = now - timedelta(days=settings.ERROR_LOG_RETENTION_DAYS)
        error_logs = await _delete_in_batches(
            session, ErrorLog, [ErrorLog.id], ErrorLog.created_at, ErrorLog.created_at < cutoff
        )
    refresh_tokens = await _delete_in_batches(
        session,
        RefreshToken,
        [RefreshToken.id],
        RefreshToken.expires_at,
        RefreshToken.expires_at < now - REFRESH_KEPT_AFTER_EXPIRY,
    )
    grace = timedelta(seconds=settings.REFRESH_REUSE_GRACE_SECONDS)
    refresh_successors = await _clear_successors(session, now - grace - SUCCESSOR_KEPT_AFTER_GRACE)
    yesterday = now.date() - timedelta(days=1)
    usage_daily = await _delete_in_batches(
        session, UsageDaily, [UsageDaily.user_id, UsageDaily.day], UsageDaily.day, UsageDaily.day < yesterday
    )
    invites = 0
    if settings.INVITE_RETENTION_DAYS > 0:
        ended = now - timedelta(days=settings.INVITE_RETENTION_DAYS)
        ended_before = or_(Invite.expires_at < ended, Invite.revoked_at < ended, Invite.used_up_at < ended)
        invites = await _delete_in_batches(session, Invite, [Invite.id], Invite.created_at, ended_before)
    blob_cutoff = now - UNUSED_BLOB_MARGIN
    unsent_files = unsent_blobs = 0
    if settings.UPLOAD_RETENTION_HOURS > 0:
        unsent_cutoff = now - timedelta(hours=settings.UPLOAD_RETENTION_HOURS)
        unsent_files, unsent_blobs = await _sweep_unsent_files(session, unsent_cutoff, blob_cutoff)
    file_blobs = unsent_blobs + (await _sweep_unused_blobs(session, blob_cutoff) if unused_blobs else 0)
    swept = Swept(
        error_logs=error_logs,
        refresh_tokens=refresh_tokens,
        usage_daily=usage_daily,
        invites=invites,
        unsent_files=unsent_files,
        file_blobs=file_blobs,
        refresh_successors=refresh_successors,
    )
    if any(astuple(swept)):
        logger.info(
            "retention sweep deleted %d error-log row(s), %d expired refresh token(s), %d old quota counter(s),"
            " %d ended invite(s), %d unsent upload(s), %d unused file content(s), and cleared %d spent refresh"
            " token(s)' successor",
            *astuple(swept),
        )
    return swept
