-- Budgets (issue #25): declared by `tally.budget` records in the usage topic and counted by the
-- rater in log order, so a replay from offset zero rebuilds all three tables exactly.

-- Each customer's budgets as the rater last read them: one row per budget in force.
CREATE TABLE tally.budgets (
    customer_id text NOT NULL,
    budget text NOT NULL,
    period text NOT NULL CHECK (period IN ('hour', 'day', 'week', 'month', 'billing_period', 'total')),
    measure text NOT NULL CHECK (measure IN ('tokens', 'calls', 'money', 'meter')),
    -- "tokens", "calls", the currency code (money) or the meter's name.
    unit text NOT NULL,
    -- Nano-units of the currency for money; tokens or meter units otherwise.
    limit_value bigint NOT NULL CHECK (limit_value > 0),
    alert_at integer[] NOT NULL,
    enforced boolean NOT NULL,
    dimensions jsonb NOT NULL,
    -- A dimension each value of which has a budget of its own (run_id), or NULL.
    per text,
    -- An anomaly watch: an hour at factor_percent / 100 times the mean of the baseline_hours
    -- before it (and at least limit_value) is anomalous. NULL for a budget.
    anomaly_factor_percent integer,
    baseline_hours integer,
    event_id text NOT NULL,
    -- The declaration that set the limit: alerts of this limit carry its position in their ids.
    declared_partition integer NOT NULL,
    declared_offset bigint NOT NULL,
    declared_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, budget)
);

-- What each budget counted in each of its periods (same units as its limit), per value of its
-- `per` dimension ('' for a budget of all its usage). Values are keyed by their md5: a value
-- may be longer than a btree index row holds.
CREATE TABLE tally.budget_usage (
    customer_id text NOT NULL,
    budget text NOT NULL,
    period_start timestamptz NOT NULL,
    value text NOT NULL,
    period_end timestamptz NOT NULL,
    used bigint NOT NULL
) WITH (fillfactor = 70);
CREATE UNIQUE INDEX budget_usage_key ON tally.budget_usage (customer_id, budget, period_start, md5(value));

-- One row per crossing of an alert percentage (100: the limit itself) in a period.
CREATE TABLE tally.budget_alerts (
    alert_id text PRIMARY KEY,
    customer_id text NOT NULL,
    budget text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('budget.threshold', 'budget.limit_reached', 'usage.runaway', 'usage.anomaly')),
    -- Anomalies: the hour's usage as a percentage of its baseline (0 without one).
    percent integer NOT NULL,
    measure text NOT NULL,
    unit text NOT NULL,
    used bigint NOT NULL,
    limit_value bigint NOT NULL,
    enforced boolean NOT NULL,
    dimensions jsonb NOT NULL,
    per text,
    value text NOT NULL,
    -- Anomalies: what the hour was compared with (the mean of the hours before) and how.
    baseline bigint,
    anomaly_factor_percent integer,
    baseline_hours integer,
    period_start timestamptz NOT NULL,
    period_end timestamptz NOT NULL,
    crossed_at timestamptz NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    webhook_at timestamptz
);
CREATE INDEX budget_alerts_customer ON tally.budget_alerts (customer_id, crossed_at);
CREATE INDEX budget_alerts_webhook_due ON tally.budget_alerts (crossed_at) WHERE webhook_at IS NULL;

ALTER TABLE tally.unrateable_records DROP CONSTRAINT unrateable_records_kind_check;
ALTER TABLE tally.unrateable_records ADD CONSTRAINT unrateable_records_kind_check CHECK (kind IN ('usage', 'grant', 'void', 'budget'));
