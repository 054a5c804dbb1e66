-- Generated from migrations/ by `make schema` (python -m tools.schema_sql). Do not edit.
BEGIN;

CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE revoked_tokens (
    jti VARCHAR(64) NOT NULL, 
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_revoked_tokens PRIMARY KEY (jti)
);

CREATE INDEX ix_revoked_tokens_expires_at ON revoked_tokens (expires_at);

CREATE TABLE teams (
    id UUID NOT NULL, 
    name VARCHAR(100) NOT NULL, 
    slug VARCHAR(120) NOT NULL, 
    settings JSONB NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_teams PRIMARY KEY (id), 
    CONSTRAINT uq_teams_slug UNIQUE (slug)
);

CREATE TABLE workers (
    id UUID NOT NULL, 
    started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    heartbeat_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_workers PRIMARY KEY (id)
);

CREATE TABLE users (
    id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    email VARCHAR(320) NOT NULL, 
    password_hash VARCHAR(100) NOT NULL, 
    full_name VARCHAR(200), 
    role VARCHAR(10) NOT NULL, 
    is_active BOOLEAN NOT NULL, 
    preferences JSONB NOT NULL, 
    tokens_valid_after TIMESTAMP WITH TIME ZONE, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    last_login_at TIMESTAMP WITH TIME ZONE, 
    CONSTRAINT pk_users PRIMARY KEY (id), 
    CONSTRAINT ck_users_role CHECK (role IN ('user', 'admin')), 
    CONSTRAINT fk_users_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE
);

CREATE INDEX ix_users_team_id ON users (team_id);

CREATE UNIQUE INDEX uq_users_team_id_lower_email ON users (team_id, lower(email));

CREATE TABLE agents (
    id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    name VARCHAR(100) NOT NULL, 
    description TEXT, 
    webhook_url VARCHAR(2048) NOT NULL, 
    webhook_headers_encrypted TEXT, 
    system_prompt TEXT, 
    config JSONB NOT NULL, 
    avatar BYTEA, 
    avatar_content_type VARCHAR(50), 
    avatar_version INTEGER NOT NULL, 
    is_active BOOLEAN NOT NULL, 
    created_by UUID, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_agents PRIMARY KEY (id), 
    CONSTRAINT fk_agents_created_by_users FOREIGN KEY(created_by) REFERENCES users (id) ON DELETE SET NULL, 
    CONSTRAINT fk_agents_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE
);

CREATE INDEX ix_agents_team_id_is_active ON agents (team_id, is_active);

CREATE TABLE refresh_tokens (
    id UUID NOT NULL, 
    user_id UUID NOT NULL, 
    family_id UUID NOT NULL, 
    token_hash VARCHAR(64) NOT NULL, 
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    used_at TIMESTAMP WITH TIME ZONE, 
    revoked_at TIMESTAMP WITH TIME ZONE, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_refresh_tokens PRIMARY KEY (id), 
    CONSTRAINT fk_refresh_tokens_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE, 
    CONSTRAINT uq_refresh_tokens_token_hash UNIQUE (token_hash)
);

CREATE INDEX ix_refresh_tokens_family_id ON refresh_tokens (family_id);

CREATE INDEX ix_refresh_tokens_user_id ON refresh_tokens (user_id);

CREATE TABLE chats (
    id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    user_id UUID NOT NULL, 
    agent_id UUID NOT NULL, 
    title VARCHAR(200), 
    archived BOOLEAN NOT NULL, 
    pinned BOOLEAN NOT NULL, 
    messages JSONB NOT NULL, 
    message_count INTEGER NOT NULL, 
    last_message_at TIMESTAMP WITH TIME ZONE, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_chats PRIMARY KEY (id), 
    CONSTRAINT fk_chats_agent_id_agents FOREIGN KEY(agent_id) REFERENCES agents (id) ON DELETE CASCADE, 
    CONSTRAINT fk_chats_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE, 
    CONSTRAINT fk_chats_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
);

CREATE INDEX ix_chats_agent_id ON chats (agent_id);

CREATE INDEX ix_chats_messages ON chats USING gin (messages jsonb_path_ops);

CREATE INDEX ix_chats_team_id ON chats (team_id);

CREATE INDEX ix_chats_user_listing ON chats (user_id, archived, pinned, updated_at);

CREATE TABLE error_logs (
    id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    user_id UUID, 
    chat_id UUID, 
    agent_id UUID, 
    code VARCHAR(50) NOT NULL, 
    message TEXT NOT NULL, 
    upstream_status INTEGER, 
    detail JSONB NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_error_logs PRIMARY KEY (id), 
    CONSTRAINT fk_error_logs_agent_id_agents FOREIGN KEY(agent_id) REFERENCES agents (id) ON DELETE SET NULL, 
    CONSTRAINT fk_error_logs_chat_id_chats FOREIGN KEY(chat_id) REFERENCES chats (id) ON DELETE SET NULL, 
    CONSTRAINT fk_error_logs_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE, 
    CONSTRAINT fk_error_logs_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE SET NULL
);

CREATE INDEX ix_error_logs_team_id_created_at ON error_logs (team_id, created_at);

INSERT INTO alembic_version (version_num) VALUES ('0001') RETURNING alembic_version.version_num;

-- Running upgrade 0001 -> 0002

CREATE INDEX ix_users_lower_email ON users (lower(email));

UPDATE alembic_version SET version_num='0002' WHERE alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

CREATE TABLE invites (
    id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    token_hash VARCHAR(64) NOT NULL, 
    email VARCHAR(320), 
    role VARCHAR(10) NOT NULL, 
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    max_uses INTEGER NOT NULL, 
    uses INTEGER NOT NULL, 
    revoked_at TIMESTAMP WITH TIME ZONE, 
    created_by UUID, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_invites PRIMARY KEY (id), 
    CONSTRAINT ck_invites_role CHECK (role IN ('user', 'admin')), 
    CONSTRAINT ck_invites_uses CHECK (uses >= 0 AND uses <= max_uses), 
    CONSTRAINT fk_invites_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE, 
    CONSTRAINT fk_invites_created_by_users FOREIGN KEY(created_by) REFERENCES users (id) ON DELETE SET NULL, 
    CONSTRAINT uq_invites_token_hash UNIQUE (token_hash)
);

CREATE INDEX ix_invites_team_id_created_at ON invites (team_id, created_at);

UPDATE alembic_version SET version_num='0003' WHERE alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

ALTER TABLE refresh_tokens ADD COLUMN successor_encrypted TEXT;

UPDATE alembic_version SET version_num='0004' WHERE alembic_version.version_num = '0003';

-- Running upgrade 0004 -> 0005

CREATE TABLE messages (
    id UUID NOT NULL, 
    chat_id UUID NOT NULL, 
    parent_id UUID, 
    role VARCHAR(10) NOT NULL, 
    content TEXT NOT NULL, 
    status VARCHAR(12) NOT NULL, 
    error JSONB, 
    metadata JSONB, 
    feedback JSONB, 
    worker_id UUID, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_messages PRIMARY KEY (id), 
    CONSTRAINT fk_messages_chat_id_chats FOREIGN KEY(chat_id) REFERENCES chats (id) ON DELETE CASCADE, 
    CONSTRAINT fk_messages_parent_id_messages FOREIGN KEY(parent_id) REFERENCES messages (id) ON DELETE CASCADE
);

CREATE INDEX ix_messages_chat_id_created_at ON messages (chat_id, created_at);

CREATE INDEX ix_messages_parent_id_created_at ON messages (parent_id, created_at);

CREATE INDEX ix_messages_chat_roots ON messages (chat_id, created_at) WHERE parent_id IS NULL;

CREATE UNIQUE INDEX uq_messages_chat_id_streaming ON messages (chat_id) WHERE status = 'streaming';

ALTER TABLE chats ADD COLUMN current_message_id UUID;

DROP INDEX ix_chats_messages;

ALTER TABLE chats DROP COLUMN messages;

UPDATE alembic_version SET version_num='0005' WHERE alembic_version.version_num = '0004';

-- Running upgrade 0005 -> 0006

ALTER TABLE agents ADD COLUMN slug VARCHAR(64);

ALTER TABLE agents ALTER COLUMN slug SET NOT NULL;

CREATE UNIQUE INDEX uq_agents_team_id_slug ON agents (team_id, slug);

CREATE TABLE usage_records (
    id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    user_id UUID, 
    agent_id UUID, 
    chat_id UUID, 
    outcome VARCHAR(20) NOT NULL, 
    error_code VARCHAR(50), 
    chars_in INTEGER NOT NULL, 
    chars_out INTEGER NOT NULL, 
    tokens_in INTEGER, 
    tokens_out INTEGER, 
    ttfc_ms INTEGER, 
    duration_ms INTEGER NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_usage_records PRIMARY KEY (id), 
    CONSTRAINT ck_usage_records_outcome CHECK (outcome IN ('complete', 'error', 'cancelled', 'interrupted')), 
    CONSTRAINT fk_usage_records_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE, 
    CONSTRAINT fk_usage_records_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE SET NULL, 
    CONSTRAINT fk_usage_records_agent_id_agents FOREIGN KEY(agent_id) REFERENCES agents (id) ON DELETE SET NULL
);

CREATE INDEX ix_usage_records_team_id_created_at ON usage_records (team_id, created_at) INCLUDE (user_id, agent_id, outcome, chars_in, chars_out, tokens_in, tokens_out, ttfc_ms, duration_ms);

CREATE INDEX ix_usage_records_user_id_created_at ON usage_records (user_id, created_at);

CREATE TABLE usage_daily (
    user_id UUID NOT NULL, 
    day DATE NOT NULL, 
    generations INTEGER NOT NULL, 
    CONSTRAINT pk_usage_daily PRIMARY KEY (user_id, day), 
    CONSTRAINT fk_usage_daily_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
);

UPDATE alembic_version SET version_num='0006' WHERE alembic_version.version_num = '0005';

-- Running upgrade 0006 -> 0007

CREATE TABLE idempotency_keys (
    user_id UUID NOT NULL, 
    key VARCHAR(255) NOT NULL, 
    request_hash VARCHAR(64) NOT NULL, 
    chat_id UUID NOT NULL, 
    user_message_id VARCHAR(36), 
    assistant_message_id VARCHAR(36), 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_idempotency_keys PRIMARY KEY (user_id, key), 
    CONSTRAINT fk_idempotency_keys_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
);

CREATE INDEX ix_idempotency_keys_expires_at ON idempotency_keys (expires_at);

UPDATE alembic_version SET version_num='0007' WHERE alembic_version.version_num = '0006';

-- Running upgrade 0007 -> 0008

CREATE TABLE api_keys (
    id UUID NOT NULL, 
    user_id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    name VARCHAR(100) NOT NULL, 
    prefix VARCHAR(16) NOT NULL, 
    key_hash VARCHAR(64) NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    expires_at TIMESTAMP WITH TIME ZONE, 
    last_used_at TIMESTAMP WITH TIME ZONE, 
    CONSTRAINT pk_api_keys PRIMARY KEY (id), 
    CONSTRAINT fk_api_keys_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE, 
    CONSTRAINT fk_api_keys_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE, 
    CONSTRAINT uq_api_keys_key_hash UNIQUE (key_hash)
);

CREATE INDEX ix_api_keys_user_id_created_at ON api_keys (user_id, created_at);

CREATE INDEX ix_api_keys_team_id_created_at ON api_keys (team_id, created_at);

UPDATE alembic_version SET version_num='0008' WHERE alembic_version.version_num = '0007';

-- Running upgrade 0008 -> 0009

ALTER TABLE agents ADD COLUMN response_mode VARCHAR(16) DEFAULT 'stream' NOT NULL;

UPDATE alembic_version SET version_num='0009' WHERE alembic_version.version_num = '0008';

-- Running upgrade 0009 -> 0010

CREATE TABLE widget_sessions (
    user_id UUID NOT NULL, 
    agent_id UUID NOT NULL, 
    session_id VARCHAR(200) NOT NULL, 
    chat_id UUID NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_widget_sessions PRIMARY KEY (user_id, agent_id, session_id), 
    CONSTRAINT fk_widget_sessions_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE, 
    CONSTRAINT fk_widget_sessions_agent_id_agents FOREIGN KEY(agent_id) REFERENCES agents (id) ON DELETE CASCADE, 
    CONSTRAINT fk_widget_sessions_chat_id_chats FOREIGN KEY(chat_id) REFERENCES chats (id) ON DELETE CASCADE, 
    CONSTRAINT uq_widget_sessions_chat_id UNIQUE (chat_id)
);

UPDATE alembic_version SET version_num='0010' WHERE alembic_version.version_num = '0009';

-- Running upgrade 0010 -> 0011

CREATE TABLE usage_rollups (
    team_id UUID NOT NULL, 
    day DATE NOT NULL, 
    agent_id UUID NOT NULL, 
    user_id UUID NOT NULL, 
    generations BIGINT NOT NULL, 
    completed BIGINT NOT NULL, 
    errors BIGINT NOT NULL, 
    cancelled BIGINT NOT NULL, 
    chars_in BIGINT NOT NULL, 
    chars_out BIGINT NOT NULL, 
    tokens_in BIGINT, 
    tokens_out BIGINT, 
    ttfc_hist NUMERIC NOT NULL, 
    duration_hist NUMERIC NOT NULL, 
    CONSTRAINT pk_usage_rollups PRIMARY KEY (team_id, day, agent_id, user_id), 
    CONSTRAINT fk_usage_rollups_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE
);

DROP INDEX ix_usage_records_team_id_created_at;

CREATE INDEX ix_usage_records_team_id_created_at ON usage_records (team_id, created_at);

UPDATE alembic_version SET version_num='0011' WHERE alembic_version.version_num = '0010';

-- Running upgrade 0011 -> 0012

ALTER TABLE agents ADD COLUMN file_delivery VARCHAR(16) DEFAULT 'url' NOT NULL;

ALTER TABLE messages ADD COLUMN files JSONB;

CREATE TABLE file_blobs (
    sha256 VARCHAR(64) NOT NULL, 
    size INTEGER NOT NULL, 
    data BYTEA NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_file_blobs PRIMARY KEY (sha256)
);

CREATE TABLE files (
    id UUID NOT NULL, 
    chat_id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    user_id UUID NOT NULL, 
    message_id UUID, 
    filename VARCHAR(255) NOT NULL, 
    content_type VARCHAR(100) NOT NULL, 
    size INTEGER NOT NULL, 
    sha256 VARCHAR(64) NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_files PRIMARY KEY (id), 
    CONSTRAINT fk_files_chat_id_chats FOREIGN KEY(chat_id) REFERENCES chats (id) ON DELETE CASCADE, 
    CONSTRAINT fk_files_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE, 
    CONSTRAINT fk_files_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE, 
    CONSTRAINT fk_files_sha256_file_blobs FOREIGN KEY(sha256) REFERENCES file_blobs (sha256)
);

CREATE INDEX ix_files_chat_id_created_at ON files (chat_id, created_at);

CREATE INDEX ix_files_sha256 ON files (sha256);

UPDATE alembic_version SET version_num='0012' WHERE alembic_version.version_num = '0011';

-- Running upgrade 0012 -> 0013

CREATE TABLE shares (
    id UUID NOT NULL, 
    team_id UUID NOT NULL, 
    chat_id UUID, 
    user_id UUID, 
    agent_id UUID, 
    title VARCHAR(200), 
    messages JSONB NOT NULL, 
    message_count INTEGER NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_shares PRIMARY KEY (id), 
    CONSTRAINT fk_shares_team_id_teams FOREIGN KEY(team_id) REFERENCES teams (id) ON DELETE CASCADE, 
    CONSTRAINT fk_shares_chat_id_chats FOREIGN KEY(chat_id) REFERENCES chats (id) ON DELETE SET NULL, 
    CONSTRAINT fk_shares_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE SET NULL, 
    CONSTRAINT fk_shares_agent_id_agents FOREIGN KEY(agent_id) REFERENCES agents (id) ON DELETE SET NULL, 
    CONSTRAINT uq_shares_chat_id UNIQUE (chat_id)
);

CREATE INDEX ix_shares_team_id_updated_at ON shares (team_id, updated_at);

UPDATE alembic_version SET version_num='0013' WHERE alembic_version.version_num = '0012';

-- Running upgrade 0013 -> 0014

CREATE TABLE share_files (
    id UUID NOT NULL, 
    share_id UUID NOT NULL, 
    filename VARCHAR(255) NOT NULL, 
    content_type VARCHAR(100) NOT NULL, 
    size INTEGER NOT NULL, 
    sha256 VARCHAR(64) NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    CONSTRAINT pk_share_files PRIMARY KEY (id), 
    CONSTRAINT fk_share_files_share_id_shares FOREIGN KEY(share_id) REFERENCES shares (id) ON DELETE CASCADE, 
    CONSTRAINT fk_share_files_sha256_file_blobs FOREIGN KEY(sha256) REFERENCES file_blobs (sha256)
);

CREATE INDEX ix_share_files_share_id ON share_files (share_id);

CREATE INDEX ix_share_files_sha256 ON share_files (sha256);

UPDATE alembic_version SET version_num='0014' WHERE alembic_version.version_num = '0013';

-- Running upgrade 0014 -> 0015

ALTER TABLE messages ADD COLUMN last_event_id INTEGER;

UPDATE alembic_version SET version_num='0015' WHERE alembic_version.version_num = '0014';

-- Running upgrade 0015 -> 0016

COMMIT;

CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_error_logs_created_at ON error_logs (created_at);

BEGIN;

UPDATE alembic_version SET version_num='0016' WHERE alembic_version.version_num = '0015';

-- Running upgrade 0016 -> 0017

COMMIT;

CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_refresh_tokens_expires_at ON refresh_tokens (expires_at);

BEGIN;

UPDATE alembic_version SET version_num='0017' WHERE alembic_version.version_num = '0016';

-- Running upgrade 0017 -> 0018

UPDATE alembic_version SET version_num='0018' WHERE alembic_version.version_num = '0017';

-- Running upgrade 0018 -> 0019

COMMIT;

CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_files_unsent_created_at ON files (created_at) WHERE message_id IS NULL;

BEGIN;

ALTER TABLE invites ADD COLUMN used_up_at TIMESTAMP WITH TIME ZONE;

UPDATE alembic_version SET version_num='0019' WHERE alembic_version.version_num = '0018';

-- Running upgrade 0019 -> 0020

UPDATE alembic_version SET version_num='0020' WHERE alembic_version.version_num = '0019';

-- Running upgrade 0020 -> 0021

COMMIT;

CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_refresh_tokens_successor_used_at ON refresh_tokens (used_at) WHERE successor_encrypted IS NOT NULL;

BEGIN;

UPDATE alembic_version SET version_num='0021' WHERE alembic_version.version_num = '0020';

COMMIT;

