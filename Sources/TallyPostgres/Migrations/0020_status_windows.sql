-- A model call's status (issue #24: success, retry, error, cancelled; the `status` property the
-- gateway and the provider endpoints write) splits the token windows, so usage shows what failed
-- and cancelled calls used: 'other' for any other value of the property, '' for events without
-- it. The views gain the column at their end (CREATE OR REPLACE keeps the views built on them,
-- and their grants).
--
-- Windows counted before this migration have '' where the log's events may carry a status, so
-- `tally reconcile` and a replay's comparison show them as mismatches until the aggregator's
-- state is rebuilt from the log: stop the aggregators, migrate, start the new binaries, then
-- `tally replay --consumer aggregator --live-group G --promote` (docs/replay.md).
ALTER TABLE tally.usage_windows_hourly ADD COLUMN status text NOT NULL DEFAULT ''
    CHECK (status IN ('', 'success', 'retry', 'error', 'cancelled', 'other'));
ALTER TABLE tally.usage_window_deltas ADD COLUMN status text NOT NULL DEFAULT ''
    CHECK (status IN ('', 'success', 'retry', 'error', 'cancelled', 'other'));
ALTER TABLE tally.usage_windows_hourly DROP CONSTRAINT usage_windows_hourly_pkey;
ALTER TABLE tally.usage_windows_hourly ADD PRIMARY KEY (customer_id, window_start, model, feature, provider, environment, status);

CREATE OR REPLACE VIEW tally.usage_windows AS
SELECT customer_id, window_start, model, feature, provider, environment,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cache_read_input_tokens) AS cache_read_input_tokens,
       sum(cache_write_input_tokens) AS cache_write_input_tokens,
       sum(reasoning_output_tokens) AS reasoning_output_tokens,
       sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count,
       status
FROM (SELECT customer_id, window_start, model, feature, provider, environment, status, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count FROM tally.usage_windows_hourly
      UNION ALL
      SELECT customer_id, window_start, model, feature, provider, environment, status, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count FROM tally.usage_window_deltas) w
GROUP BY customer_id, window_start, model, feature, provider, environment, status;

CREATE OR REPLACE VIEW tally.usage_hourly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, window_start, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count,
       NULLIF(status, '') AS status
FROM tally.usage_windows;

CREATE OR REPLACE VIEW tally.usage_daily AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('day', window_start, 'UTC') AS window_start,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cache_read_input_tokens) AS cache_read_input_tokens,
       sum(cache_write_input_tokens) AS cache_write_input_tokens,
       sum(reasoning_output_tokens) AS reasoning_output_tokens,
       sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count,
       NULLIF(status, '') AS status
FROM tally.usage_windows
GROUP BY customer_id, model, feature, provider, environment, status, date_trunc('day', window_start, 'UTC');

CREATE OR REPLACE VIEW tally.usage_monthly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('month', window_start, 'UTC') AS window_start,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cache_read_input_tokens) AS cache_read_input_tokens,
       sum(cache_write_input_tokens) AS cache_write_input_tokens,
       sum(reasoning_output_tokens) AS reasoning_output_tokens,
       sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count,
       NULLIF(status, '') AS status
FROM tally.usage_windows
GROUP BY customer_id, model, feature, provider, environment, status, date_trunc('month', window_start, 'UTC');
