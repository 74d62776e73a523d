-- Window deltas are appended, not upserted. Upserting every window a batch touches cost about as
-- much as the rest of the batch's writes together (an index probe and a row update per window,
-- at tens of thousands of windows per batch). Each batch now appends its hourly deltas to an
-- unindexed table, in the same transaction as its offsets, and tally-aggregator folds them into
-- usage_windows_hourly in bulk: once enough have gathered, and whenever it is idle. A fold moves
-- rows from one table to the other in one transaction, so no reader ever sees a window twice or
-- not at all. The hourly rows are the folded rows plus the deltas, summed: that is the view
-- usage_windows, and every read view is built on it.
-- The hourly table's columns, types and NOT NULLs, in its order; not its key or fill factor.
CREATE TABLE tally.usage_window_deltas (LIKE tally.usage_windows_hourly);

-- Every hourly window, folded or not ('' for missing labels, as in usage_windows_hourly).
CREATE VIEW tally.usage_windows AS
SELECT customer_id, window_start, model, feature, provider, environment,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cache_read_input_tokens)::bigint AS cache_read_input_tokens,
       sum(cache_write_input_tokens)::bigint AS cache_write_input_tokens,
       sum(reasoning_output_tokens)::bigint AS reasoning_output_tokens,
       sum(total_tokens)::bigint AS total_tokens,
       sum(event_count)::bigint AS event_count
FROM (SELECT customer_id, window_start, model, feature, provider, environment, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count FROM tally.usage_windows_hourly
      UNION ALL
      SELECT customer_id, window_start, model, feature, provider, environment, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count FROM tally.usage_window_deltas) w
GROUP BY customer_id, window_start, model, feature, provider, environment;

CREATE OR REPLACE VIEW tally.usage_hourly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, window_start, input_tokens, output_tokens,
       cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count
FROM tally.usage_windows;

CREATE OR REPLACE VIEW tally.usage_daily AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('day', window_start, 'UTC') AS window_start,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cache_read_input_tokens)::bigint AS cache_read_input_tokens,
       sum(cache_write_input_tokens)::bigint AS cache_write_input_tokens,
       sum(reasoning_output_tokens)::bigint AS reasoning_output_tokens,
       sum(total_tokens)::bigint AS total_tokens,
       sum(event_count)::bigint AS event_count
FROM tally.usage_windows
GROUP BY customer_id, model, feature, provider, environment, date_trunc('day', window_start, 'UTC');

CREATE OR REPLACE VIEW tally.usage_monthly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('month', window_start, 'UTC') AS window_start,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cache_read_input_tokens)::bigint AS cache_read_input_tokens,
       sum(cache_write_input_tokens)::bigint AS cache_write_input_tokens,
       sum(reasoning_output_tokens)::bigint AS reasoning_output_tokens,
       sum(total_tokens)::bigint AS total_tokens,
       sum(event_count)::bigint AS event_count
FROM tally.usage_windows
GROUP BY customer_id, model, feature, provider, environment, date_trunc('month', window_start, 'UTC');

CREATE OR REPLACE VIEW tally.dashboard_usage_daily AS
SELECT customer_id, model, (window_start AT TIME ZONE 'UTC')::date AS day,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count
FROM tally.usage_windows
GROUP BY customer_id, model, (window_start AT TIME ZONE 'UTC')::date;

CREATE OR REPLACE VIEW tally.dashboard_top_customers AS
SELECT month, customer_id, total_tokens, event_count,
       rank() OVER (PARTITION BY month ORDER BY total_tokens DESC) AS rank
FROM (SELECT date_trunc('month', window_start AT TIME ZONE 'UTC')::date AS month, customer_id,
             sum(total_tokens) AS total_tokens, sum(event_count) AS event_count
      FROM tally.usage_windows GROUP BY 1, 2) monthly;
