-- Webhooks (issue #25): alerts delivered to registered endpoints as signed JSON following the
-- Standard Webhooks convention, from an outbox. Not derived from the log: endpoints are
-- configuration, messages and deliveries are the outbox's bookkeeping, and a replay leaves them
-- be (a message's id derives from the alert it carries, so a replayed alert is the same message).

-- Where messages go. The secret (whsec_ + base64 of 32 random bytes) signs every attempt.
CREATE TABLE tally.webhook_endpoints (
    endpoint_id text PRIMARY KEY,
    url text NOT NULL CHECK (url ~ '^https?://'),
    secret text NOT NULL CHECK (secret LIKE 'whsec\_%'),
    -- The message types it receives; empty: all of them.
    event_types text[] NOT NULL DEFAULT '{}',
    description text NOT NULL DEFAULT '',
    disabled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per alert, invoice or other occurrence, with the exact bytes every attempt sends.
CREATE TABLE tally.webhook_messages (
    message_id text PRIMARY KEY,
    event_type text NOT NULL,
    customer_id text NOT NULL,
    payload text NOT NULL,
    occurred_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_messages_by_customer ON tally.webhook_messages (customer_id, created_at);

-- Each message to each endpoint subscribed when it was made (or when it was re-sent).
CREATE TABLE tally.webhook_deliveries (
    message_id text NOT NULL REFERENCES tally.webhook_messages,
    endpoint_id text NOT NULL REFERENCES tally.webhook_endpoints ON DELETE CASCADE,
    attempts integer NOT NULL DEFAULT 0,
    -- Due at this time; a sender that takes it moves it on by its lease, so a sender killed
    -- in the middle of an attempt leaves it due again once the lease has passed.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    -- Gave up after the last attempt; `tally webhooks resend` starts it again.
    failed_at timestamptz,
    last_attempt_at timestamptz,
    last_status integer,
    last_error text,
    PRIMARY KEY (message_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON tally.webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

-- What the outbox has made a message of: the sources it reads are stamped, and read through
-- partial indexes of what is not.
ALTER TABLE tally.balance_alerts ADD COLUMN webhook_at timestamptz;
ALTER TABLE tally.topup_requests ADD COLUMN webhook_at timestamptz;
ALTER TABLE tally.invoices ADD COLUMN webhook_at timestamptz;
CREATE INDEX balance_alerts_webhook_due ON tally.balance_alerts (crossed_at) WHERE webhook_at IS NULL;
CREATE INDEX topup_requests_webhook_due ON tally.topup_requests (requested_at) WHERE webhook_at IS NULL;
CREATE INDEX invoices_webhook_due ON tally.invoices (closed_at) WHERE webhook_at IS NULL;
-- What was raised before webhooks existed is not sent (`tally webhooks resend` cannot reach it
-- either: it has no message).
UPDATE tally.balance_alerts SET webhook_at = now();
UPDATE tally.topup_requests SET webhook_at = now();
UPDATE tally.invoices SET webhook_at = now();
