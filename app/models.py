"""ORM tables of the whole product; behaviour lives in app/services."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    Uuid,
    func,
    literal_column,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import utcnow
from app.dialects import Histogram, JSONType, UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(Uuid, primary_key=True, default=uuid.uuid4)


def _created() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, nullable=False, default=utcnow)


def _updated() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow)


def default_team_settings() -> dict[str, Any]:
    """New teams are closed: a team id is no secret, so joining takes an invite unless an admin opens it."""
    return {"open_registration": False}


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    slug: Mapped[str] = mapped_column(String(120), nullable=False, unique=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=default_team_settings)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'admin')", name="role"),
        Index("uq_users_team_id_lower_email", "team_id", func.lower(text("email")), unique=True),
        # Login without team_id looks the email up across teams.
        Index("ix_users_lower_email", func.lower(text("email"))),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False, index=True)
    email: Mapped[str] = mapped_column(String(320), nullable=False)
    password_hash: Mapped[str] = mapped_column(String(100), nullable=False)
    full_name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(10), nullable=False, default="user")
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    preferences: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    #: Tokens issued before this instant are refused (password change, deactivation).
    tokens_valid_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Agent(Base):
    __tablename__ = "agents"
    __table_args__ = (
        Index("ix_agents_team_id_is_active", "team_id", "is_active"),
        # Inactive agents keep theirs: a slug is never reused within the team (it names a `/v1` model).
        Index("uq_agents_team_id_slug", "team_id", "slug", unique=True),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    #: `[a-z0-9-]{1,64}`, unique in the team (app.slugs).
    slug: Mapped[str] = mapped_column(String(64), nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    webhook_url: Mapped[str] = mapped_column(String(2048), nullable=False)
    #: Fernet token of the JSON object of headers; never leaves the server in clear.
    webhook_headers_encrypted: Mapped[str | None] = mapped_column(Text)
    system_prompt: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    avatar_content_type: Mapped[str | None] = mapped_column(String(50))
    avatar_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    #: `stream` (the webhook's answer is the reply) or `callback` (the reply comes by callbacks: app.callbacks).
    response_mode: Mapped[str] = mapped_column(String(16), nullable=False, default="stream", server_default="stream")
    #: How a message's files reach n8n: `url`, `multipart` or `base64` (docs/FILES.md).
    file_delivery: Mapped[str] = mapped_column(String(16), nullable=False, default="url", server_default="url")
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class Chat(Base):
    """A conversation. Its messages are rows of `messages` forming a tree; `current_message_id` is the leaf of
    the branch shown. `message_count` and `last_message_at` are kept in step by the transaction that adds
    messages (app/services/messages.py), so listing chats never reads a message.
    """

    __tablename__ = "chats"
    __table_args__ = (Index("ix_chats_user_listing", "user_id", "archived", "pinned", "updated_at"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False, index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), nullable=False, index=True)
    title: Mapped[str | None] = mapped_column(String(200))
    archived: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    pinned: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    #: The leaf of the branch shown (null for an empty chat). No foreign key: chats and messages would
    #: reference each other, and every write that moves it checks the message's chat itself.
    current_message_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    message_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_message_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


#: At most one `streaming` message per chat, on both databases: "one generation per chat" holds across
#: branches and server instances because the second placeholder cannot be inserted.
STREAMING_ONLY = text("status = 'streaming'")
#: The same condition for queries: a literal, not a bound parameter, so the partial index serves it even in
#: a prepared statement's generic plan (which knows no parameter values).
IS_STREAMING = literal_column("messages.status") == literal_column("'streaming'")
ROOTS_ONLY = text("parent_id IS NULL")
#: Uploads no message carries yet: the retention sweep finds the old ones by a partial index on this.
UNSENT_ONLY = text("message_id IS NULL")
#: Spent refresh tokens still holding their successor: the retention sweep finds the old ones by a partial index.
WITH_SUCCESSOR = text("successor_encrypted IS NOT NULL")


class Message(Base):
    """One message of a chat's tree: `parent_id` is the message it follows (null for a first message).

    A user message's children are the answers to it (regenerations are siblings); an assistant message's
    children are the next questions (edits are siblings). `worker_id` names the server process streaming an
    assistant message, so recovery can tell a dead worker's `streaming` rows.
    """

    __tablename__ = "messages"
    __table_args__ = (
        # Children of a parent, oldest first (siblings; the newest-descendant walk; the parent key's cascade).
        Index("ix_messages_parent_id_created_at", "parent_id", "created_at"),
        # A chat's messages in order (GET /api/chats/{id}/messages).
        Index("ix_messages_chat_id_created_at", "chat_id", "created_at"),
        # A chat's first messages (the siblings of its root): one small entry per root.
        Index("ix_messages_chat_roots", "chat_id", "created_at", postgresql_where=ROOTS_ONLY, sqlite_where=ROOTS_ONLY),
        Index(
            "uq_messages_chat_id_streaming",
            "chat_id",
            unique=True,
            postgresql_where=STREAMING_ONLY,
            sqlite_where=STREAMING_ONLY,
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    chat_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"), nullable=False)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(10), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False, default="")
    status: Mapped[str] = mapped_column(String(12), nullable=False)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: `metadata` is reserved on declarative classes; the column keeps the API's name.
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    feedback: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: A user message's attachments as the API shows them (`[File]`, immutable once sent; null: none), kept on
    #: the row so reading a message never joins `files` (app.services.files).
    files: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    worker_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    #: An answer's terminal SSE event id, written by its final write (null: not ended by it, e.g. interrupted):
    #: a stream rebuilt from storage ends under the same id (app.eventlog.rebuilt_stream).
    last_event_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class FileBlob(Base):
    """A file's bytes, stored once per content (the key is their SHA-256): every `files` row with that hash
    reads them, so copying a file (a share's copy) is a new `files` row, never a copy of the bytes. Blobs no
    row (a chat's file or a share's copy) references any more are removed by app.services.blobs.collect_blobs."""

    __tablename__ = "file_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False, deferred=True)
    created_at: Mapped[datetime] = _created()


class File(Base):
    """A file uploaded to a chat. Unsent until a user message names it (`message_id`); goes with its chat, or
    UPLOAD_RETENTION_HOURS after its upload while still unsent (app.services.retention)."""

    __tablename__ = "files"
    __table_args__ = (
        # A chat's files, and its unsent ones (the per-chat caps count them).
        Index("ix_files_chat_id_created_at", "chat_id", "created_at"),
        Index("ix_files_sha256", "sha256"),
        # Unsent uploads, oldest first: the retention sweep (UPLOAD_RETENTION_HOURS) reads only these.
        Index("ix_files_unsent_created_at", "created_at", postgresql_where=UNSENT_ONLY, sqlite_where=UNSENT_ONLY),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    chat_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"), nullable=False)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    #: The user message that first carried it; null while unsent. No foreign key: the message row is inserted
    #: in the same statement batch that sets it, and both go with the chat.
    message_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    content_type: Mapped[str] = mapped_column(String(100), nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    #: Restricting: a blob cannot go while a file names it (the collector's delete fails and keeps it).
    sha256: Mapped[str] = mapped_column(ForeignKey("file_blobs.sha256"), nullable=False)
    created_at: Mapped[datetime] = _created()


class Share(Base):
    """A read-only snapshot of a chat's current branch, readable by every member of the chat's team.

    The snapshot belongs to the team: it outlives its chat (`chat_id` becomes null) and its sharer
    (`user_id` becomes null). `messages` holds the branch as the API shows Messages (JSON), so a message's
    later fields travel with it without a schema change. One share per chat: sharing again replaces the
    snapshot under the same id, so a link already sent keeps working.
    """

    __tablename__ = "shares"
    __table_args__ = (Index("ix_shares_team_id_updated_at", "team_id", "updated_at"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False)
    chat_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("chats.id", ondelete="SET NULL"), unique=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"))
    title: Mapped[str | None] = mapped_column(String(200))
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, nullable=False)
    message_count: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = _created()
    #: When the snapshot was last taken (sharing again moves it): the team's list is newest first by it.
    updated_at: Mapped[datetime] = _updated()


class ShareFile(Base):
    """A share's own copy of a file its snapshot's messages carry: a row over the same blob (no byte copied),
    owned by the share and gone with it, so the share keeps its files when the chat (and its files) go.
    Readable at `GET /api/shares/{share_id}/files/{id}` by the share's team (app.services.shares)."""

    __tablename__ = "share_files"
    __table_args__ = (Index("ix_share_files_share_id", "share_id"), Index("ix_share_files_sha256", "sha256"))

    id: Mapped[uuid.UUID] = _uuid_pk()
    share_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("shares.id", ondelete="CASCADE"), nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    content_type: Mapped[str] = mapped_column(String(100), nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    #: Restricting, as `files.sha256`: the collector never removes bytes a share copy names.
    sha256: Mapped[str] = mapped_column(ForeignKey("file_blobs.sha256"), nullable=False)
    created_at: Mapped[datetime] = _created()


class RefreshToken(Base):
    """A refresh token, stored hashed; rotation spends it, and reuse of a spent one kills its family.

    A row past its expiry serves nothing (the token's own `exp` is refused before any lookup): the retention
    sweep (app.services.retention) deletes it a day later."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (
        # Spent tokens still holding their successor, by use: the retention sweep clears it past the reuse window.
        Index(
            "ix_refresh_tokens_successor_used_at",
            "used_at",
            postgresql_where=WITH_SUCCESSOR,
            sqlite_where=WITH_SUCCESSOR,
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    family_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The pair's refresh token this one was rotated into (Fernet), handed again to a caller that presents
    #: this token within REFRESH_REUSE_GRACE_SECONDS of its use: two tabs share one chain, never fork it. The
    #: retention sweep clears it a minute after that window (it is a live token: nothing keeps it longer).
    successor_encrypted: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class RevokedToken(Base):
    """Access-token ids revoked before their expiry (the database revocation store)."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)


class Invite(Base):
    """An invitation into a team; only the SHA-256 of its token is stored, so a database leak opens no team.

    `uses` is only ever raised by one conditional UPDATE (see app.services.invites.register_with_invite), and the check
    constraint backs it: a team can never be joined more often than `max_uses`. INVITE_RETENTION_DAYS after it
    ended (expired, revoked or used up) app.services.retention deletes it.
    """

    __tablename__ = "invites"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'admin')", name="role"),
        CheckConstraint("uses >= 0 AND uses <= max_uses", name="uses"),
        Index("ix_invites_team_id_created_at", "team_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    #: Lower-cased; when set, only this email may register with the invite.
    email: Mapped[str | None] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(10), nullable=False, default="user")
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    max_uses: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    uses: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When the last allowed use was made (`uses` reached `max_uses`); null before, and for invites used up
    #: before migration 0018, which the retention sweep then dates by their expiry.
    used_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()


class ErrorLog(Base):
    """A failed generation's diagnostics (n8n's status and message), for the team's admins. Rows older than
    ERROR_LOG_RETENTION_DAYS are deleted by app.services.retention (`ix_error_logs_created_at` serves it)."""

    __tablename__ = "error_logs"
    __table_args__ = (
        Index("ix_error_logs_team_id_created_at", "team_id", "created_at"),
        Index("ix_error_logs_created_at", "created_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    chat_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("chats.id", ondelete="SET NULL"))
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"))
    code: Mapped[str] = mapped_column(String(50), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    upstream_status: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    created_at: Mapped[datetime] = _created()


class Worker(Base):
    """A live server process; its heartbeat tells start-up recovery whose streams are still running."""

    __tablename__ = "workers"

    id: Mapped[uuid.UUID] = _uuid_pk()
    started_at: Mapped[datetime] = _created()
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class UsageRecord(Base):
    """The usage ledger: one row per generation, written in the transaction of its final message.

    Never per chunk. Rows outlive their chat, user and agent (usage is history); only the team's go with it.
    """

    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint("outcome IN ('complete', 'error', 'cancelled', 'interrupted')", name="outcome"),
        # A team's rows in time order (the roll-up's back-fill) and a user's rows of today (the daily quota).
        # The reports read the roll-up (UsageRollup), not these rows.
        Index("ix_usage_records_team_id_created_at", "team_id", "created_at"),
        Index("ix_usage_records_user_id_created_at", "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"))
    #: No foreign key: users delete chats, and each delete would scan the ledger to null the ids out.
    chat_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    outcome: Mapped[str] = mapped_column(String(20), nullable=False)
    error_code: Mapped[str | None] = mapped_column(String(50))
    chars_in: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    chars_out: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    tokens_in: Mapped[int | None] = mapped_column(Integer)
    tokens_out: Mapped[int | None] = mapped_column(Integer)
    ttfc_ms: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = _created()


class UsageRollup(Base):
    """The usage ledger summed per team and UTC day, at four grains, kept in the transaction of each ledger row.

    `agent_id` / `user_id` are `NIL` for "all": (NIL, NIL) is the team's day, (agent, NIL) an agent's, (NIL,
    user) a user's, (agent, user) a user's with one agent. No foreign keys on them: usage outlives its users and
    agents (an id no longer found is reported as deleted, as the ledger's nulled ids are; a ledger row whose id
    was already nulled is rolled up under `GONE`). `*_hist` are histograms of `ttfc_ms` and `duration_ms`
    (app.services.usage_rollup), summed like the counters; the reports take their medians from them.
    """

    __tablename__ = "usage_rollups"

    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    generations: Mapped[int] = mapped_column(BigInteger, nullable=False)
    completed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    errors: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cancelled: Mapped[int] = mapped_column(BigInteger, nullable=False)
    chars_in: Mapped[int] = mapped_column(BigInteger, nullable=False)
    chars_out: Mapped[int] = mapped_column(BigInteger, nullable=False)
    #: Null while no ledger row of the group has a count (as the ledger's sum would be).
    tokens_in: Mapped[int | None] = mapped_column(BigInteger)
    tokens_out: Mapped[int | None] = mapped_column(BigInteger)
    ttfc_hist: Mapped[int] = mapped_column(Histogram, nullable=False)
    duration_hist: Mapped[int] = mapped_column(Histogram, nullable=False)


class UsageDaily(Base):
    """Generations started per user and UTC day: the quota's counter, raised by one conditional upsert
    (app.services.usage.claim_generation), so concurrent sends can never overshoot the quota. Only today's
    row is read (and yesterday's given back): older ones are deleted by app.services.retention."""

    __tablename__ = "usage_daily"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    generations: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class IdempotencyKey(Base):
    """A send's `Idempotency-Key`, per user for 24 h: a retry answers the generation it started, never a new one.

    `request_hash` is the SHA-256 of the path and body: the same key with another request is refused.
    `assistant_message_id` is empty while the first request is still checking and storing its message.
    """

    __tablename__ = "idempotency_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Not a foreign key: the key is claimed before the chat is even looked up (a retry is answered before any
    #: other check), so it may name a chat that does not exist; such a claim is given back at once.
    chat_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_message_id: Mapped[str | None] = mapped_column(String(36))
    assistant_message_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)


class ApiKey(Base):
    """A member's personal API key. Only an HMAC of the key is stored (keys are 256 random bits, so a
    fast keyed hash is enough), with a short `prefix` to recognise it in lists; deleting the row revokes it.

    `last_used_at` is written at most once a minute per key (app.services.api_keys.touch), not per request.
    """

    __tablename__ = "api_keys"
    __table_args__ = (
        Index("ix_api_keys_user_id_created_at", "user_id", "created_at"),
        Index("ix_api_keys_team_id_created_at", "team_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WidgetSession(Base):
    """The chat that a session id of n8n's chat widget names, per caller and agent (POST /api/agents/{id}/n8n-chat).

    The widget picks its own session id (kept in the browser's localStorage); the key includes the user, so
    the same id sent by someone else names another chat (or none). The row goes with its chat.
    """

    __tablename__ = "widget_sessions"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    chat_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"), nullable=False, unique=True)
    created_at: Mapped[datetime] = _created()
