-- The dedup horizon (invariant 2, TallyCore's DedupHorizon). Each partition's log clock: the
-- greatest record timestamp (ms since the epoch) a consumer group has read below next_offset,
-- moved with the offset in every batch's transaction; NULL until a record with a timestamp was
-- read. A replay's schema starts at NULL and reads the same records, so it decides the same.
-- Groups that consumed before this migration start their clock at their next batch.
ALTER TABLE tally.consumer_offsets ADD COLUMN log_clock_ms bigint;

-- Every consumer of a topic refuses usage events whose time lies more than this many days
-- before the partition's log clock (past_dedup_horizon). Recorded with the topic's layout, so
-- the aggregator, the rater and replays of the topic decide alike.
ALTER TABLE tally.topic_layouts ADD COLUMN dedup_horizon_days integer NOT NULL DEFAULT 35
    CHECK (dedup_horizon_days BETWEEN 1 AND 36500);

-- Where each partition stood when the horizon was introduced: records below it were counted
-- without one, so no consumer or replay judges them (and none moves its log clock with them),
-- whichever offset its own group had reached. Partitions of topics consumed later start at 0.
CREATE TABLE tally.dedup_horizon_start (
    topic text NOT NULL,
    partition integer NOT NULL,
    from_offset bigint NOT NULL CHECK (from_offset >= 0),
    PRIMARY KEY (topic, partition)
);
INSERT INTO tally.dedup_horizon_start (topic, partition, from_offset)
SELECT topic, partition, max(next_offset) FROM tally.consumer_offsets
WHERE consumer_group NOT LIKE 'tally-replay-%'
GROUP BY topic, partition;
