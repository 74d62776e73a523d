-- Price books may price meters (issue #24): a meter's charge is a rated_usage row whose
-- token_type is 'meter' and whose model column names the meter; invoices show it the same way.
ALTER TABLE tally.rated_usage DROP CONSTRAINT rated_usage_token_type_check;
ALTER TABLE tally.rated_usage ADD CONSTRAINT rated_usage_token_type_check
    CHECK (token_type IN ('input', 'output', 'cache_read', 'cache_write', 'cache_write_1h', 'reasoning', 'meter'));

-- Model revenue stays tokens only; meters get views of their own.
CREATE OR REPLACE VIEW tally.dashboard_model_revenue AS
SELECT date_trunc('month', period_start AT TIME ZONE 'UTC')::date AS month, model, currency,
       sum(quantity) AS tokens, sum(amount_nanos)::numeric / 1000000000 AS revenue
FROM tally.rated_usage
WHERE token_type <> 'meter'
GROUP BY 1, 2, 3;

-- Revenue per meter and month.
CREATE VIEW tally.dashboard_meter_revenue AS
SELECT date_trunc('month', period_start AT TIME ZONE 'UTC')::date AS month, model AS meter, currency,
       sum(quantity) AS units, sum(amount_nanos)::numeric / 1000000000 AS revenue
FROM tally.rated_usage
WHERE token_type = 'meter'
GROUP BY 1, 2, 3;

-- Each meter's daily figure per customer and dimension values (exact for every aggregation).
CREATE VIEW tally.dashboard_meter_usage_daily AS
SELECT (window_start AT TIME ZONE 'UTC')::date AS day, customer_id, meter, dimensions, aggregation, value
FROM tally.meter_windows
WHERE granularity = 'day';

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_reader') THEN
        GRANT SELECT ON tally.dashboard_meter_revenue, tally.dashboard_meter_usage_daily TO tally_reader;
    END IF;
END
$$;
