-- Aggregator: dedup keys, materialized usage windows, conflicts, and the read views.

-- Dedup keys of counted events (invariant 2): kept regardless of event time,
-- at least as long as the topic retains data.
CREATE TABLE tally.usage_event_keys (
    customer_id text NOT NULL,
    event_id text NOT NULL,
    content_hash bigint NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    PRIMARY KEY (customer_id, event_id)
);

-- Hourly window rows, the one materialized table: missing optional labels are ''
-- here (so the primary key works) and NULL in the views. Daily and monthly
-- windows are views over these rows, so the three can never disagree.
CREATE TABLE tally.usage_windows_hourly (
    customer_id text NOT NULL,
    window_start timestamptz NOT NULL,
    model text NOT NULL,
    feature text NOT NULL,
    provider text NOT NULL,
    environment text NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cache_read_input_tokens bigint NOT NULL,
    cache_write_input_tokens bigint NOT NULL,
    reasoning_output_tokens bigint NOT NULL,
    total_tokens bigint NOT NULL,
    event_count bigint NOT NULL,
    PRIMARY KEY (customer_id, window_start, model, feature, provider, environment)
);
-- Upserts rewrite rows in place: leave room on each page for HOT updates.
ALTER TABLE tally.usage_windows_hourly SET (fillfactor = 80);

-- The same event id seen again with other content: the first by offset counts.
CREATE TABLE tally.event_conflicts (
    id bigserial PRIMARY KEY,
    consumer_group text NOT NULL,
    customer_id text NOT NULL,
    event_id text NOT NULL,
    first_hash bigint NOT NULL,
    conflicting_hash bigint NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer_group, topic, partition, record_offset)
);

-- The read contract for dashboards and tools.
CREATE VIEW tally.usage_hourly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, window_start, input_tokens, output_tokens,
       cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count
FROM tally.usage_windows_hourly;

CREATE VIEW tally.usage_daily AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('day', window_start, 'UTC') AS window_start,
       sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens,
       sum(cache_read_input_tokens)::bigint AS cache_read_input_tokens,
       sum(cache_write_input_tokens)::bigint AS cache_write_input_tokens,
       sum(reasoning_output_tokens)::bigint AS reasoning_output_tokens,
       sum(total_tokens)::bigint AS total_tokens, sum(event_count)::bigint AS event_count
FROM tally.usage_windows_hourly
GROUP BY customer_id, model, feature, provider, environment, date_trunc('day', window_start, 'UTC');

CREATE VIEW tally.usage_monthly AS
SELECT customer_id, model, NULLIF(feature, '') AS feature, NULLIF(provider, '') AS provider,
       NULLIF(environment, '') AS environment, date_trunc('month', window_start, 'UTC') AS window_start,
       sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens,
       sum(cache_read_input_tokens)::bigint AS cache_read_input_tokens,
       sum(cache_write_input_tokens)::bigint AS cache_write_input_tokens,
       sum(reasoning_output_tokens)::bigint AS reasoning_output_tokens,
       sum(total_tokens)::bigint AS total_tokens, sum(event_count)::bigint AS event_count
FROM tally.usage_windows_hourly
GROUP BY customer_id, model, feature, provider, environment, date_trunc('month', window_start, 'UTC');
