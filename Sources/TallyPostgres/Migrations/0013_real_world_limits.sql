-- Real-world limits (issue #19): no valid input may trap or stop billing.
--
-- Window sums are numeric. One event holds at most 2^53 - 1 tokens of each kind, so about a
-- thousand of the largest pass bigint in one window; a fold then failed ("bigint out of range")
-- for every customer, and so did every read of the windows. Delta rows stay bigint (a batch whose
-- sum for a window passes bigint writes several rows that add up to it); folded rows and the views
-- over them are numeric, which holds any sum exactly.
DROP VIEW tally.usage_windows CASCADE;  -- and the views built on it, recreated below

ALTER TABLE tally.usage_windows_hourly
    ALTER COLUMN input_tokens TYPE numeric,
    ALTER COLUMN output_tokens TYPE numeric,
    ALTER COLUMN cache_read_input_tokens TYPE numeric,
    ALTER COLUMN cache_write_input_tokens TYPE numeric,
    ALTER COLUMN reasoning_output_tokens TYPE numeric,
    ALTER COLUMN total_tokens TYPE numeric,
    ALTER COLUMN event_count TYPE numeric;

CREATE VIEW tally.usage_windows AS
SELECT customer_id, window_start, model, feature, provider, environment,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cache_read_input_tokens) AS cache_read_input_tokens,
       sum(cache_write_input_tokens) AS cache_write_input_tokens,
       sum(reasoning_output_tokens) AS reasoning_output_tokens,
       sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count
FROM (SELECT customer_id, window_start, model, feature, provider, environment, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count FROM tally.usage_windows_hourly
      UNION ALL
      SELECT customer_id, window_start, model, feature, provider, environment, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count FROM tally.usage_window_deltas) w
GROUP BY customer_id, window_start, model, feature, provider, environment;

CREATE VIEW tally.usage_hourly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, window_start, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count
FROM tally.usage_windows;

CREATE VIEW tally.usage_daily AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('day', window_start, 'UTC') AS window_start,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cache_read_input_tokens) AS cache_read_input_tokens,
       sum(cache_write_input_tokens) AS cache_write_input_tokens,
       sum(reasoning_output_tokens) AS reasoning_output_tokens,
       sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count
FROM tally.usage_windows
GROUP BY customer_id, model, feature, provider, environment, date_trunc('day', window_start, 'UTC');

CREATE VIEW tally.usage_monthly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('month', window_start, 'UTC') AS window_start,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cache_read_input_tokens) AS cache_read_input_tokens,
       sum(cache_write_input_tokens) AS cache_write_input_tokens,
       sum(reasoning_output_tokens) AS reasoning_output_tokens,
       sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count
FROM tally.usage_windows
GROUP BY customer_id, model, feature, provider, environment, date_trunc('month', window_start, 'UTC');

CREATE VIEW tally.dashboard_usage_daily AS
SELECT customer_id, model, (window_start AT TIME ZONE 'UTC')::date AS day,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count
FROM tally.usage_windows
GROUP BY customer_id, model, (window_start AT TIME ZONE 'UTC')::date;

CREATE VIEW tally.dashboard_top_customers AS
SELECT month, customer_id, total_tokens, event_count,
       rank() OVER (PARTITION BY month ORDER BY total_tokens DESC) AS rank
FROM (SELECT date_trunc('month', window_start AT TIME ZONE 'UTC')::date AS month, customer_id,
             sum(total_tokens) AS total_tokens, sum(event_count) AS event_count
      FROM tally.usage_windows GROUP BY 1, 2) monthly;

-- Records the rater kept aside because rating them would leave the range amounts are stored in
-- (an Int64 of nano-units, 9,223,372,036.854775807 currency units; a quantity past 2^63 - 1).
-- They changed no charge, wallet or ledger; the consumer moved on with the others. Keyed by
-- position, so a batch re-applied after a lost COMMIT reply records each once.
CREATE TABLE tally.unrateable_records (
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    customer_id text NOT NULL,
    event_id text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('usage', 'grant')),
    event_time timestamptz NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (partition, record_offset)
);

-- Anthropic bills 1-hour cache writes at 2x the input price, 5-minute ones at 1.25x: their own token type.
ALTER TABLE tally.rated_usage DROP CONSTRAINT rated_usage_token_type_check;
ALTER TABLE tally.rated_usage ADD CONSTRAINT rated_usage_token_type_check
    CHECK (token_type IN ('input', 'output', 'cache_read', 'cache_write', 'cache_write_1h', 'reasoning'));

-- Context tiers: a request with more input tokens than a tier's threshold is priced whole at the
-- tier's rates, and its quantities accumulate apart from the base prices' (0: no tier).
ALTER TABLE tally.rated_usage ADD COLUMN context_above bigint NOT NULL DEFAULT 0 CHECK (context_above >= 0);
ALTER TABLE tally.rated_usage DROP CONSTRAINT rated_usage_pkey;
ALTER TABLE tally.rated_usage ADD PRIMARY KEY
    (customer_id, period_start, book_name, book_customer, book_version, model, token_type, context_above);
ALTER TABLE tally.invoice_lines ADD COLUMN context_above bigint;

-- The unpriced event itself (canonical JSON, the same content hash), so `tally pricing
-- rate-unpriced` can send it again once a price exists; NULL for rows kept before.
ALTER TABLE tally.unpriced_usage ADD COLUMN document text;
