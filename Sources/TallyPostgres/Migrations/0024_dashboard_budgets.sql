-- Budgets for the dashboards (issue #25): each budget with what it counted in its latest
-- period (0 before any usage; a budget per value: its most used value), and the alerts it
-- raised. Money in currency units.
CREATE VIEW tally.dashboard_budgets AS
SELECT b.customer_id, b.budget, b.period, b.measure, b.unit,
       CASE WHEN b.measure = 'money' THEN round(b.limit_value::numeric / 1000000000, 9) ELSE b.limit_value END AS limit_value,
       CASE WHEN b.measure = 'money' THEN round(coalesce(u.used, 0)::numeric / 1000000000, 9) ELSE coalesce(u.used, 0) END AS used,
       round(coalesce(u.used, 0)::numeric * 100 / b.limit_value, 1) AS used_percent,
       u.period_start, u.period_end AS resets_at, b.enforced, b.dimensions::text AS dimensions, b.per, u.value
FROM tally.budgets b
LEFT JOIN LATERAL (
    SELECT used, period_start, period_end, value FROM tally.budget_usage x
    WHERE x.customer_id = b.customer_id AND x.budget = b.budget ORDER BY period_start DESC, used DESC, value LIMIT 1
) u ON true;

CREATE VIEW tally.dashboard_budget_alerts AS
SELECT crossed_at, customer_id, budget, kind, percent, unit,
       CASE WHEN measure = 'money' THEN round(used::numeric / 1000000000, 9) ELSE used END AS used,
       CASE WHEN measure = 'money' THEN round(limit_value::numeric / 1000000000, 9) ELSE limit_value END AS limit_value,
       period_start, dimensions::text AS dimensions, per, value
FROM tally.budget_alerts;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_reader') THEN
        GRANT SELECT ON tally.dashboard_budgets, tally.dashboard_budget_alerts TO tally_reader;
    END IF;
END
$$;
