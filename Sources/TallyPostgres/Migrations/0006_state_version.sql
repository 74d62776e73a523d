-- Bumped when `tally replay --promote` replaces a partition's state: a running consumer that
-- keeps state in memory (the rater) sees the change in its next offset compare-and-set and
-- reads the promoted state afresh instead of writing its cached one over it.
ALTER TABLE tally.consumer_offsets ADD COLUMN state_version bigint NOT NULL DEFAULT 0;
