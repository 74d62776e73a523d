-- Foundation: consumer positions and dead letters, shared by every consumer.

-- Each consumer's position per partition, written in the same transaction as
-- its state (invariant 1). owner_epoch fences zombies: an instance takes a
-- partition by bumping the epoch, and commits only while the epoch is still its own.
CREATE TABLE tally.consumer_offsets (
    consumer_group text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    next_offset bigint NOT NULL DEFAULT 0 CHECK (next_offset >= 0),
    owner_epoch bigint NOT NULL DEFAULT 0,
    owner_instance text,
    committed_at timestamptz,
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Records that are no valid event of any known type, kept with the reason;
-- the same record also goes to the dead-letter topic.
CREATE TABLE tally.dead_letters (
    id bigserial PRIMARY KEY,
    consumer_group text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    reason_code text NOT NULL,
    reason text NOT NULL,
    record_key bytea,
    record_value bytea,
    record_size integer NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer_group, topic, partition, record_offset)
);
