-- A partition whose log ended below the offset a consumer group had stored: the broker started
-- on new storage, the topic was recreated, or records it had acknowledged were lost. The
-- consumer that first sees it records where the log ended then and stops reading that partition:
-- records appended below its stored offset would otherwise be taken for counted ones and skipped,
-- even after the log grows past it again. `tally check-log` reports these rows and offers the
-- choices; `--keep` and `tally replay --promote` clear them.
CREATE TABLE tally.log_gaps (
    consumer_group text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL CHECK (partition >= 0),
    stored_offset bigint NOT NULL,
    log_end bigint NOT NULL CHECK (log_end >= 0),
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
