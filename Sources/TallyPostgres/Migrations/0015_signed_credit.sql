-- Credit records (tally.wallet.grant, tally.wallet.grant.void) are applied only when signed with
-- a credit key (docs/security.md, "Signed credit"). Per partition, the first offset whose credit
-- must be signed: the live rater records its group's position when it first claims a partition
-- (in the claim's transaction, which fences any older rater), so credit an older rater applied
-- unsigned stays applied, and a replay from offset zero applies exactly what the live run did.
-- Not derived from the log: back it up with the configuration; delete a topic's rows when the
-- topic is recreated.
CREATE TABLE tally.unsigned_credit_horizon (
    topic text NOT NULL,
    partition integer NOT NULL CHECK (partition >= 0),
    signed_from_offset bigint NOT NULL CHECK (signed_from_offset >= 0),
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- The dashboards' role (`tally_reader`, made by deploy/postgres/init-roles.sh or scripts/stack)
-- reads the dashboard views and nothing else: not API key hashes, the ledger or customers' events.
-- Views run with their owner's rights, so the tables stay closed to it. Where the role does not
-- exist (a database of its own), nothing is granted.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_reader') THEN
        ALTER DEFAULT PRIVILEGES IN SCHEMA tally REVOKE SELECT ON TABLES FROM tally_reader;
        REVOKE ALL ON ALL TABLES IN SCHEMA tally FROM tally_reader;
        GRANT USAGE ON SCHEMA tally TO tally_reader;
        GRANT SELECT ON tally.dashboard_usage_daily, tally.dashboard_top_customers, tally.dashboard_model_revenue,
            tally.dashboard_wallets, tally.dashboard_rejections, tally.dashboard_consumer_positions,
            tally.dashboard_ingest_latency TO tally_reader;
    END IF;
END
$$;
