-- Prior history for `scripts/bench history`: :'events' events of 1,000 customers over the 90 days
-- before :'before' (an RFC 3339 time), as the aggregator and the rater would have left them with
-- no grants (every charge overage): each consumer's dedup key, overage entries per customer and
-- day, hourly windows, rated totals per month and the wallets they add up to. Loaded in bulk with
-- the key primary keys dropped and built again, as a restore would; the tables' own
-- definitions (migrations) otherwise stand.
\set ON_ERROR_STOP on
SET search_path = tally;
SET maintenance_work_mem = '1GB';
SET synchronous_commit = off;
-- Event i: customer i % 1000, partition i % 4, 90 days spread evenly before :'before'; its keys at
-- offset -i, below every offset of the topic, so none meets a row the consumers write.
CREATE TEMP VIEW history AS
SELECT i, 'cust-' || (i % 1000) AS customer_id, 'hist-' || i AS event_id, (i % 4)::int AS partition,
       (:'before'::timestamptz - interval '90 days' + (interval '90 days' / :'events'::bigint) * i) AS at
FROM generate_series(1, :'events'::bigint) AS i;

ALTER TABLE usage_event_keys DROP CONSTRAINT usage_event_keys_pkey;
INSERT INTO usage_event_keys (customer_id, event_id, event_source, content_hash, partition, record_offset)
SELECT customer_id, event_id, 'tally://loadgen', i * 7919, partition, -i FROM history;
ALTER TABLE usage_event_keys ADD PRIMARY KEY (customer_id, event_id, event_source);

ALTER TABLE rater_event_keys DROP CONSTRAINT rater_event_keys_pkey;
INSERT INTO rater_event_keys (customer_id, event_id, event_source, content_hash, partition, record_offset)
SELECT customer_id, event_id, 'tally://loadgen', i * 7919, partition, -i FROM history;
ALTER TABLE rater_event_keys ADD PRIMARY KEY (customer_id, event_id, event_source);

INSERT INTO wallet_overage (customer_id, currency, period_start, day, partition, amount_nanos, entries, first_offset, last_offset, last_effective_at)
SELECT customer_id, 'USD', date_trunc('month', at, 'UTC'), (at AT TIME ZONE 'UTC')::date, partition, sum(-1500000), count(*), min(-i), max(-i), max(at)
FROM history GROUP BY 1, 2, 3, 4, 5;

INSERT INTO usage_windows_hourly (customer_id, window_start, model, feature, provider, environment, status, input_tokens, output_tokens,
                                  cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count)
SELECT customer_id, date_trunc('hour', at, 'UTC'), 'gpt-4o-mini', '', 'openai', '', '', sum(1000), sum(500), 0, 0, 0, sum(1500), count(*)
FROM history GROUP BY 1, 2;

INSERT INTO rated_usage (customer_id, period_start, book_name, book_customer, book_version, model, token_type, currency, quantity, amount_nanos, pricing)
SELECT customer_id, date_trunc('month', at, 'UTC'), 'list', '', 1, 'gpt-4o-mini', 'input', 'USD', sum(1000), sum(1500000), 'history'
FROM history GROUP BY 1, 2;

INSERT INTO wallets (customer_id, currency, balance_nanos)
SELECT customer_id, 'USD', sum(-1500000) FROM history GROUP BY 1;
