-- Usage no price book priced, per UTC day, customer and model (issue #25, the operator's view):
-- billed at nothing until a price book prices it, then `tally pricing rate-unpriced` or a
-- replay rates it. The Grafana panel "Unpriced usage" and alert TallyUnpricedUsage point here.
CREATE VIEW tally.dashboard_unpriced_usage AS
SELECT (event_time AT TIME ZONE 'UTC')::date AS day, customer_id, model,
       count(*) AS events, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens
FROM tally.unpriced_usage
GROUP BY 1, 2, 3;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_reader') THEN
        GRANT SELECT ON tally.dashboard_unpriced_usage TO tally_reader;
    END IF;
END
$$;
