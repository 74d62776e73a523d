-- Price rules (issue #24): a model's or meter's prices for events with given dimensions (a
-- feature, a service tier, the batch API). A rule's quantities accumulate apart from the base
-- prices', and invoice lines name the rule that priced them ('' for the base prices).
ALTER TABLE tally.rated_usage ADD COLUMN price_rule text NOT NULL DEFAULT '';
ALTER TABLE tally.rated_usage DROP CONSTRAINT rated_usage_pkey;
ALTER TABLE tally.rated_usage ADD PRIMARY KEY
    (customer_id, period_start, book_name, book_customer, book_version, model, token_type, context_above, price_rule);
ALTER TABLE tally.invoice_lines ADD COLUMN price_rule text;

-- Revenue per model, token type and rule: what a feature, a service tier or failed calls brought in.
CREATE VIEW tally.dashboard_price_rule_revenue AS
SELECT date_trunc('month', period_start AT TIME ZONE 'UTC')::date AS month, model, token_type, price_rule, currency,
       sum(quantity) AS quantity, sum(amount_nanos)::numeric / 1000000000 AS revenue
FROM tally.rated_usage
GROUP BY 1, 2, 3, 4, 5;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_reader') THEN
        GRANT SELECT ON tally.dashboard_price_rule_revenue TO tally_reader;
    END IF;
END
$$;
