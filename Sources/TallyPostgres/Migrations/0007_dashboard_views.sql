-- Dashboard views: what Grafana (or any SQL client) reads. Money is exact numeric in currency units.

-- Usage per customer, model and UTC day.
CREATE VIEW tally.dashboard_usage_daily AS
SELECT customer_id, model, (window_start AT TIME ZONE 'UTC')::date AS day,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(total_tokens) AS total_tokens,
       sum(event_count) AS event_count
FROM tally.usage_windows_hourly
GROUP BY customer_id, model, (window_start AT TIME ZONE 'UTC')::date;

-- Customers ranked by tokens per UTC calendar month (1 = most).
CREATE VIEW tally.dashboard_top_customers AS
SELECT month, customer_id, total_tokens, event_count,
       rank() OVER (PARTITION BY month ORDER BY total_tokens DESC) AS rank
FROM (SELECT date_trunc('month', window_start AT TIME ZONE 'UTC')::date AS month, customer_id,
             sum(total_tokens) AS total_tokens, sum(event_count) AS event_count
      FROM tally.usage_windows_hourly GROUP BY 1, 2) monthly;

-- Rated tokens and revenue per model, currency and month of the billing period's start.
CREATE VIEW tally.dashboard_model_revenue AS
SELECT date_trunc('month', period_start AT TIME ZONE 'UTC')::date AS month, model, currency,
       sum(quantity) AS tokens, sum(amount_nanos)::numeric / 1000000000 AS revenue
FROM tally.rated_usage
GROUP BY 1, 2, 3;

-- Wallet balances, with each customer's highest low-balance threshold and whether it is below it.
CREATE VIEW tally.dashboard_wallets AS
SELECT w.customer_id, w.currency, w.balance_nanos::numeric / 1000000000 AS balance,
       (SELECT max(t) FROM unnest(c.low_balance_thresholds_nanos) AS t)::numeric / 1000000000 AS threshold,
       coalesce(w.balance_nanos < (SELECT max(t) FROM unnest(c.low_balance_thresholds_nanos) AS t), false) AS below_threshold,
       w.blocked
FROM tally.wallets w LEFT JOIN tally.customers c ON c.customer_id = w.customer_id;

-- Records the consumers could not count, per UTC day: dead letters by reason, and conflicts.
CREATE VIEW tally.dashboard_rejections AS
SELECT (recorded_at AT TIME ZONE 'UTC')::date AS day, consumer_group, 'dead_letter' AS kind, reason_code AS reason, count(*) AS records
FROM tally.dead_letters GROUP BY 1, 2, 4
UNION ALL
SELECT (recorded_at AT TIME ZONE 'UTC')::date, consumer_group, 'conflict', 'same id, other content', count(*)
FROM tally.event_conflicts GROUP BY 1, 2;

-- Where each consumer stands and how long ago it last committed (the lag itself needs the
-- broker's log end: tally status).
CREATE VIEW tally.dashboard_consumer_positions AS
SELECT consumer_group, topic, partition, next_offset, committed_at, owner_instance,
       extract(epoch FROM now() - committed_at)::bigint AS seconds_since_commit
FROM tally.consumer_offsets;
