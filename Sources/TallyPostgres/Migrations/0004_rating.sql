-- Rater: price books, customers, rated usage, wallets (ledger, grants, alerts), invoices.
-- Money columns are bigint nano-units (1e-9 of the currency); views show exact numeric.

-- Every version of every price book, as applied (`tally pricing apply`). book_customer is ''
-- for a plan and the customer id for an override. The document is the canonical JSON.
CREATE TABLE tally.price_books (
    book_name text NOT NULL,
    book_customer text NOT NULL DEFAULT '',
    version integer NOT NULL CHECK (version > 0),
    effective_from timestamptz NOT NULL,
    currency char(3) NOT NULL,
    document text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (book_name, book_customer, version)
);

-- Billing settings per customer; customers without a row get the defaults.
CREATE TABLE tally.customers (
    customer_id text PRIMARY KEY,
    plan text NOT NULL DEFAULT 'default',
    currency char(3) NOT NULL DEFAULT 'USD',
    billing_anchor_day smallint NOT NULL DEFAULT 1 CHECK (billing_anchor_day BETWEEN 1 AND 28),
    subscription_fee_nanos bigint NOT NULL DEFAULT 0 CHECK (subscription_fee_nanos >= 0),
    overage_policy text NOT NULL DEFAULT 'allow' CHECK (overage_policy IN ('allow', 'stop')),
    -- NULL: overage without limit (policy allow).
    overage_limit_nanos bigint CHECK (overage_limit_nanos >= 0),
    low_balance_thresholds_nanos bigint[] NOT NULL DEFAULT '{}',
    auto_topup_below_nanos bigint,
    auto_topup_amount_nanos bigint CHECK (auto_topup_amount_nanos > 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((auto_topup_below_nanos IS NULL) = (auto_topup_amount_nanos IS NULL))
);

-- The rater's own dedup keys (usage and grants share the (customer, event id) space).
CREATE TABLE tally.rater_event_keys (
    customer_id text NOT NULL,
    event_id text NOT NULL,
    content_hash bigint NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    PRIMARY KEY (customer_id, event_id)
);

-- Cumulative quantity per (customer, billing period, price item) and its charge,
-- amount_nanos = charge(quantity), rounded once (invariant 5).
CREATE TABLE tally.rated_usage (
    customer_id text NOT NULL,
    period_start timestamptz NOT NULL,
    book_name text NOT NULL,
    book_customer text NOT NULL,
    book_version integer NOT NULL,
    model text NOT NULL,
    token_type text NOT NULL CHECK (token_type IN ('input', 'output', 'cache_read', 'cache_write', 'reasoning')),
    currency char(3) NOT NULL,
    quantity bigint NOT NULL CHECK (quantity >= 0),
    amount_nanos bigint NOT NULL,
    pricing text NOT NULL,
    PRIMARY KEY (customer_id, period_start, book_name, book_customer, book_version, model, token_type)
) WITH (fillfactor = 70);  -- every batch rewrites its rows: room for HOT updates

-- Usage no price book priced at its event time: never billed at zero silently;
-- a replay after the price appears rates it.
CREATE TABLE tally.unpriced_usage (
    customer_id text NOT NULL,
    event_id text NOT NULL,
    model text NOT NULL,
    event_time timestamptz NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cache_read_input_tokens bigint NOT NULL,
    cache_write_input_tokens bigint NOT NULL,
    reasoning_output_tokens bigint NOT NULL,
    PRIMARY KEY (customer_id, event_id)
);

-- The append-only wallet ledger (invariant 6). An entry is identified by the record it
-- came from and its place among that record's entries, so re-processing cannot add one twice.
CREATE TABLE tally.wallet_ledger (
    customer_id text NOT NULL,
    currency char(3) NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    seq integer NOT NULL,
    kind text NOT NULL CHECK (kind IN ('grant', 'usage', 'expiry')),
    amount_nanos bigint NOT NULL,
    -- The grant credited, drawn on or written off; NULL for usage beyond every grant.
    grant_id text,
    -- The usage event charged, or the grant's own id.
    event_id text NOT NULL,
    effective_at timestamptz NOT NULL,
    period_start timestamptz,
    PRIMARY KEY (customer_id, partition, record_offset, seq)
);

-- Grants and what is left of them (derived from the ledger, kept for drawing order).
CREATE TABLE tally.wallet_grants (
    customer_id text NOT NULL,
    grant_id text NOT NULL,
    currency char(3) NOT NULL,
    amount_nanos bigint NOT NULL,
    remaining_nanos bigint NOT NULL CHECK (remaining_nanos >= 0),
    priority bigint NOT NULL,
    expires_at timestamptz,
    source text NOT NULL,
    granted_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, grant_id)
);

-- Running balance and the refuse-calls flag a gateway reads.
CREATE TABLE tally.wallets (
    customer_id text NOT NULL,
    currency char(3) NOT NULL,
    balance_nanos bigint NOT NULL,
    blocked boolean NOT NULL DEFAULT false,
    blocked_since timestamptz,
    PRIMARY KEY (customer_id, currency)
) WITH (fillfactor = 70);

-- Balance = sum of ledger entries, exact.
CREATE VIEW tally.wallet_balances AS
SELECT l.customer_id, l.currency,
       sum(l.amount_nanos)::numeric / 1000000000 AS balance,
       sum(l.amount_nanos) FILTER (WHERE l.kind = 'grant')::numeric / 1000000000 AS granted,
       -sum(l.amount_nanos) FILTER (WHERE l.kind = 'usage')::numeric / 1000000000 AS charged,
       -sum(l.amount_nanos) FILTER (WHERE l.kind = 'expiry')::numeric / 1000000000 AS expired,
       coalesce(bool_or(w.blocked), false) AS blocked,
       max(l.effective_at) AS last_entry_at
FROM tally.wallet_ledger l
LEFT JOIN tally.wallets w ON w.customer_id = l.customer_id AND w.currency = l.currency
GROUP BY l.customer_id, l.currency;

-- One row per downward crossing of a low-balance threshold; published to the alerts topic after commit.
CREATE TABLE tally.balance_alerts (
    alert_id text PRIMARY KEY,
    customer_id text NOT NULL,
    currency char(3) NOT NULL,
    threshold_nanos bigint NOT NULL,
    balance_nanos bigint NOT NULL,
    crossed_at timestamptz NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    published_at timestamptz
);

-- One row per crossing of an auto top-up threshold: for the payment system to fulfil with a
-- `top_up` grant. Never more than one per crossing, so never a runaway loop.
CREATE TABLE tally.topup_requests (
    request_id text PRIMARY KEY,
    customer_id text NOT NULL,
    currency char(3) NOT NULL,
    below_nanos bigint NOT NULL,
    amount_nanos bigint NOT NULL,
    balance_nanos bigint NOT NULL,
    requested_at timestamptz NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    status text NOT NULL DEFAULT 'requested',
    published_at timestamptz
);

-- Closed billing periods: one invoice per customer, period and currency.
CREATE TABLE tally.invoices (
    invoice_id text PRIMARY KEY,
    customer_id text NOT NULL,
    period_start timestamptz NOT NULL,
    period_end timestamptz NOT NULL,
    currency char(3) NOT NULL,
    total_due_nanos bigint NOT NULL,
    document text NOT NULL,
    closed_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (customer_id, period_start, currency)
);

-- Invoice lines. Usage, adjustment and credit lines remember the exact (unrounded) amount
-- they cover, so later usage for a closed period becomes an explicit adjustment line.
CREATE TABLE tally.invoice_lines (
    invoice_id text NOT NULL REFERENCES tally.invoices ON DELETE CASCADE,
    line_no integer NOT NULL,
    kind text NOT NULL CHECK (kind IN ('usage', 'adjustment', 'subscription', 'minimum', 'credits')),
    description text NOT NULL,
    covers_period_start timestamptz NOT NULL,
    book_name text,
    book_customer text,
    book_version integer,
    model text,
    token_type text,
    quantity bigint,
    unit_price text,
    exact_amount_nanos bigint NOT NULL,
    amount_nanos bigint NOT NULL,
    PRIMARY KEY (invoice_id, line_no)
);
