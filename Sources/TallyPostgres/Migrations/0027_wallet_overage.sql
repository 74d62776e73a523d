-- Usage charged beyond every grant (overage), folded by day (issue #27). The wallet ledger
-- keeps one entry per credit movement (grants, draws on a grant, expiries, voids); the
-- charges no grant covers were one ledger entry per rated event, most of the rater's bytes
-- for customers who never buy credit. They are folded here into one entry per customer,
-- currency, billing period, UTC day of the event and partition, which says which usage it
-- charges: that customer's charged events of that day, read from that partition between
-- first_offset and last_offset (the log holds them; the rated totals and windows sum them).
-- A wallet's balance is the sum of its ledger entries and overage entries
-- (`tally.wallet_balances`). The rater adds each batch's amounts in the batch's transaction,
-- so the totals are the same whatever the batches were (invariant 4).
CREATE TABLE tally.wallet_overage (
    customer_id text NOT NULL,
    currency char(3) NOT NULL,
    period_start timestamptz NOT NULL,
    day date NOT NULL,
    partition integer NOT NULL,
    -- Signed like the ledger entries it folds: negative for charges, positive where a volume
    -- tier lowered the period's charge. numeric: a day's sum of Int64 amounts cannot overflow.
    amount_nanos numeric NOT NULL,
    entries bigint NOT NULL CHECK (entries > 0),
    first_offset bigint NOT NULL,
    last_offset bigint NOT NULL,
    last_effective_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, currency, period_start, day, partition)
) WITH (fillfactor = 70);  -- a busy customer's row is rewritten by every batch: room for HOT updates

INSERT INTO tally.wallet_overage (customer_id, currency, period_start, day, partition, amount_nanos, entries, first_offset, last_offset, last_effective_at)
SELECT customer_id, currency, period_start, (effective_at AT TIME ZONE 'UTC')::date, partition, sum(amount_nanos), count(*),
       min(record_offset), max(record_offset), max(effective_at)
FROM tally.wallet_ledger WHERE kind = 'usage' AND grant_id IS NULL AND period_start IS NOT NULL
GROUP BY customer_id, currency, period_start, (effective_at AT TIME ZONE 'UTC')::date, partition;
DELETE FROM tally.wallet_ledger WHERE kind = 'usage' AND grant_id IS NULL AND period_start IS NOT NULL;

-- Balance = sum of ledger entries and overage entries, exact.
CREATE OR REPLACE VIEW tally.wallet_balances AS
WITH entries AS (
    SELECT customer_id, currency, kind, amount_nanos::numeric AS amount_nanos, effective_at FROM tally.wallet_ledger
    UNION ALL
    SELECT customer_id, currency, 'usage', amount_nanos, last_effective_at FROM tally.wallet_overage
)
SELECT l.customer_id, l.currency,
       sum(l.amount_nanos) / 1000000000 AS balance,
       sum(l.amount_nanos) FILTER (WHERE l.kind = 'grant') / 1000000000 AS granted,
       -sum(l.amount_nanos) FILTER (WHERE l.kind = 'usage') / 1000000000 AS charged,
       -sum(l.amount_nanos) FILTER (WHERE l.kind = 'expiry') / 1000000000 AS expired,
       coalesce(bool_or(w.blocked), false) AS blocked,
       max(l.effective_at) AS last_entry_at
FROM entries l
LEFT JOIN tally.wallets w ON w.customer_id = l.customer_id AND w.currency = l.currency
GROUP BY l.customer_id, l.currency;
