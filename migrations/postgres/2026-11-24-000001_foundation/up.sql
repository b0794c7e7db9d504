-- Money is kept in nano-USD (1e-9 USD) as BIGINT so sums are exact; JSON-valued rules are TEXT
-- holding JSON so both backends share one schema.rs. Times are UTC without a zone.
CREATE TABLE users (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    status            TEXT NOT NULL DEFAULT 'active',
    level             INTEGER NOT NULL DEFAULT 1,
    fallback_levels   TEXT NOT NULL DEFAULT '[]',
    ip_allowlist      TEXT NOT NULL DEFAULT '[]',
    allowed_models    TEXT NOT NULL DEFAULT '[]',
    allowed_endpoints TEXT NOT NULL DEFAULT '[]',
    spend_limit_nanos BIGINT,
    spent_nanos       BIGINT NOT NULL DEFAULT 0,
    rpm               BIGINT,
    tpm               BIGINT,
    model_limits      TEXT NOT NULL DEFAULT '{}',
    created_at        TIMESTAMP NOT NULL,
    updated_at        TIMESTAMP NOT NULL
);

CREATE TABLE user_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT,
    key_hash    TEXT NOT NULL,
    key_hint    TEXT NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    expires_at  TIMESTAMP,
    revoked_at  TIMESTAMP
);
CREATE INDEX user_keys_user_id ON user_keys (user_id);

CREATE TABLE upstream_keys (
    id              TEXT PRIMARY KEY,
    provider        TEXT NOT NULL,
    base_url        TEXT NOT NULL,
    secret_enc      TEXT NOT NULL,
    secret_hint     TEXT NOT NULL,
    level           INTEGER NOT NULL,
    models          TEXT NOT NULL DEFAULT '[]',
    weight          INTEGER NOT NULL DEFAULT 1,
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    cooldown_until  TIMESTAMP,
    disabled_at     TIMESTAMP,
    disabled_reason TEXT,
    created_at      TIMESTAMP NOT NULL,
    updated_at      TIMESTAMP NOT NULL
);
CREATE INDEX upstream_keys_level ON upstream_keys (level);

CREATE TABLE model_mappings (
    id           TEXT PRIMARY KEY,
    from_pattern TEXT NOT NULL,
    to_model     TEXT NOT NULL,
    user_id      TEXT REFERENCES users (id) ON DELETE CASCADE,
    created_at   TIMESTAMP NOT NULL
);

CREATE TABLE prices (
    model                    TEXT PRIMARY KEY,
    input_per_mtok_nanos     BIGINT NOT NULL,
    output_per_mtok_nanos    BIGINT NOT NULL,
    cached_input_per_mtok_nanos BIGINT,
    reasoning_per_mtok_nanos BIGINT,
    per_image_nanos          BIGINT,
    per_audio_second_nanos   BIGINT,
    updated_at               TIMESTAMP NOT NULL
);

-- One row per client call that produced usage, keyed by request id so a retried batch is a no-op.
CREATE TABLE usage_records (
    request_id        TEXT PRIMARY KEY,
    ts                TIMESTAMP NOT NULL,
    user_id           TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    upstream_model    TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens  BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    images            BIGINT NOT NULL DEFAULT 0,
    audio_seconds     DOUBLE PRECISION NOT NULL DEFAULT 0,
    characters        BIGINT NOT NULL DEFAULT 0,
    cost_nanos        BIGINT NOT NULL DEFAULT 0,
    partial           BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX usage_records_user_ts ON usage_records (user_id, ts);
CREATE INDEX usage_records_ts ON usage_records (ts);

-- One row per client call, newest first in reads; pruned by age.
CREATE TABLE request_logs (
    id                TEXT PRIMARY KEY,
    ts                TIMESTAMP NOT NULL,
    user_id           TEXT,
    key_id            TEXT,
    route             TEXT NOT NULL,
    model             TEXT,
    upstream_model    TEXT,
    upstream_key_id   TEXT,
    level             INTEGER,
    status            INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    latency_ms        BIGINT NOT NULL,
    ttfb_ms           BIGINT,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost_nanos        BIGINT NOT NULL DEFAULT 0,
    partial           BOOLEAN NOT NULL DEFAULT FALSE,
    error_code        TEXT
);
CREATE INDEX request_logs_ts ON request_logs (ts);
CREATE INDEX request_logs_user_ts ON request_logs (user_id, ts);

-- Small facts about the installation: when it was first bootstrapped, the config version.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
