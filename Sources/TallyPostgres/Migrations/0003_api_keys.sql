-- Ingest API keys. Only the SHA-256 of a key is stored; the key itself is shown once.
CREATE TABLE tally.api_keys (
    key_id text PRIMARY KEY,
    key_hash bytea NOT NULL UNIQUE,
    name text NOT NULL,
    -- When set, the key may only send events whose data.environment is this value.
    environment text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
