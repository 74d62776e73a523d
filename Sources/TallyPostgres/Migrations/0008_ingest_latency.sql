-- How long records take from tally-ingest (the producer timestamp) to their usage windows
-- (the aggregator's commit): one row per committed batch. Operational data, not state: it is
-- not rebuilt by replay, and replays' rows are left out of the view.
CREATE TABLE tally.ingest_latency (
    consumer_group text NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    records integer NOT NULL,
    oldest_record_at timestamptz NOT NULL,
    newest_record_at timestamptz NOT NULL
);
CREATE INDEX ingest_latency_by_time ON tally.ingest_latency (committed_at);

-- Per minute of commit time: batches, records, and the longest and shortest ingest-to-window latency.
CREATE VIEW tally.dashboard_ingest_latency AS
SELECT date_trunc('minute', committed_at) AS minute, consumer_group, count(*) AS batches, sum(records) AS records,
       extract(epoch FROM max(committed_at - oldest_record_at))::numeric(12, 3) AS max_latency_seconds,
       extract(epoch FROM min(committed_at - newest_record_at))::numeric(12, 3) AS min_latency_seconds
FROM tally.ingest_latency
WHERE consumer_group NOT LIKE 'tally-replay-%'
GROUP BY 1, 2;
