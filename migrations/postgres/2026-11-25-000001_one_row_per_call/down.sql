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

-- Daily sums have no request ids: only the usage still in the log goes back per call.
INSERT INTO usage_records
SELECT id, ts, user_id, COALESCE(key_id, ''), COALESCE(model, ''), COALESCE(upstream_model, ''),
    prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, images, audio_seconds,
    characters, cost_nanos, partial
FROM request_logs
WHERE metered AND user_id IS NOT NULL;

DROP TABLE usage_daily;
ALTER TABLE request_logs DROP COLUMN characters;
ALTER TABLE request_logs DROP COLUMN audio_seconds;
ALTER TABLE request_logs DROP COLUMN images;
ALTER TABLE request_logs DROP COLUMN cached_tokens;
ALTER TABLE request_logs DROP COLUMN reasoning_tokens;
ALTER TABLE request_logs DROP COLUMN metered;
