-- API key scopes (docs/api.md#keys-and-scopes): what a key may do. `ingest` sends usage (events,
-- provider usage, the gateway, /v1/check); `grants` declares credit and budgets; `read` reads
-- the read API (a key of a customer reads that customer only: a portal token); `admin` may do
-- all of it for every customer, and manages price books. Keys made before scopes keep what they
-- could do: ingest, and grants where may_grant was set.
ALTER TABLE tally.api_keys ADD COLUMN scopes text[] NOT NULL DEFAULT '{ingest}';
UPDATE tally.api_keys SET scopes = '{ingest,grants}' WHERE may_grant;
ALTER TABLE tally.api_keys ADD CONSTRAINT api_keys_scopes_known
    CHECK (cardinality(scopes) > 0 AND scopes <@ '{ingest,grants,read,admin}'::text[]);
-- An admin key acts for every customer, so it is no customer's.
ALTER TABLE tally.api_keys ADD CONSTRAINT api_keys_admin_of_no_customer
    CHECK (NOT ('admin' = ANY (scopes)) OR customer_id IS NULL);
-- Portal tokens are keys that lapse: after expires_at the key is refused like a revoked one.
ALTER TABLE tally.api_keys ADD COLUMN expires_at timestamptz;

-- The read API answers a customer's lists newest first from these.
CREATE INDEX balance_alerts_customer ON tally.balance_alerts (customer_id, crossed_at);
CREATE INDEX wallet_grants_customer_granted ON tally.wallet_grants (customer_id, granted_at, grant_id);

-- A customer's usage over a month is read from the hourly windows' primary key alone (an
-- index-only scan): the sums ride along in the index, so the heap pages a busy customer's rows
-- are scattered over are not visited. Measured in scripts/bench api.
ALTER TABLE tally.usage_windows_hourly DROP CONSTRAINT usage_windows_hourly_pkey;
ALTER TABLE tally.usage_windows_hourly ADD PRIMARY KEY (customer_id, window_start, model, feature, provider, environment, status)
    INCLUDE (input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count);
