-- One row per call: the request log carries the call's usage and is written, with the spend it
-- adds, in one transaction per batch (idempotent by request id). Usage outlives the log's
-- retention as daily sums per user and model, rolled up when old entries are pruned.
ALTER TABLE request_logs ADD COLUMN metered BOOLEAN NOT NULL DEFAULT 0;
ALTER TABLE request_logs ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE request_logs ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE request_logs ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
ALTER TABLE request_logs ADD COLUMN audio_seconds DOUBLE NOT NULL DEFAULT 0;
ALTER TABLE request_logs ADD COLUMN characters BIGINT NOT NULL DEFAULT 0;

CREATE TABLE usage_daily (
    day               TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens  BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    images            BIGINT NOT NULL DEFAULT 0,
    audio_seconds     DOUBLE NOT NULL DEFAULT 0,
    characters        BIGINT NOT NULL DEFAULT 0,
    cost_nanos        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id, model)
);

-- Usage of calls still in the log moves onto their entries.
UPDATE request_logs
SET metered = 1, reasoning_tokens = u.reasoning_tokens, cached_tokens = u.cached_tokens,
    images = u.images, audio_seconds = u.audio_seconds, characters = u.characters
FROM usage_records AS u
WHERE u.request_id = request_logs.id;

-- Usage of calls whose entries were already pruned is kept per day.
INSERT INTO usage_daily (day, user_id, model, requests, prompt_tokens, completion_tokens,
    reasoning_tokens, cached_tokens, images, audio_seconds, characters, cost_nanos)
SELECT strftime('%Y-%m-%d', ts), user_id, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
    SUM(reasoning_tokens), SUM(cached_tokens), SUM(images), SUM(audio_seconds), SUM(characters),
    SUM(cost_nanos)
FROM usage_records AS u
WHERE NOT EXISTS (SELECT 1 FROM request_logs AS l WHERE l.id = u.request_id)
GROUP BY strftime('%Y-%m-%d', ts), user_id, model;

DROP TABLE usage_records;
