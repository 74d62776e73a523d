-- CloudEvents 1.0 makes source + id an event's identity; Tally scopes it to the customer. Keys
-- stored before this migration have no source: they are marked chr(1) (no valid source holds a
-- control character) and stand, as they did, for the id from every source. A promoted replay
-- (tally replay --promote) rebuilds them with their sources from the log.
-- Wallet grants are identified by their id alone (the wallet's idempotency key): source ''.
ALTER TABLE tally.usage_event_keys ADD COLUMN event_source text COLLATE "C" NOT NULL DEFAULT chr(1);
ALTER TABLE tally.usage_event_keys ALTER COLUMN event_source DROP DEFAULT;
ALTER TABLE tally.usage_event_keys DROP CONSTRAINT usage_event_keys_pkey;
ALTER TABLE tally.usage_event_keys ADD PRIMARY KEY (customer_id, event_id, event_source);

ALTER TABLE tally.rater_event_keys ADD COLUMN event_source text COLLATE "C" NOT NULL DEFAULT chr(1);
ALTER TABLE tally.rater_event_keys ALTER COLUMN event_source DROP DEFAULT;
UPDATE tally.rater_event_keys k SET event_source = ''
FROM tally.wallet_grants g
WHERE g.customer_id = k.customer_id AND g.grant_id = k.event_id;
ALTER TABLE tally.rater_event_keys DROP CONSTRAINT rater_event_keys_pkey;
ALTER TABLE tally.rater_event_keys ADD PRIMARY KEY (customer_id, event_id, event_source);

ALTER TABLE tally.unpriced_usage ADD COLUMN event_source text NOT NULL DEFAULT chr(1);
ALTER TABLE tally.unpriced_usage ALTER COLUMN event_source DROP DEFAULT;
ALTER TABLE tally.unpriced_usage DROP CONSTRAINT unpriced_usage_pkey;
ALTER TABLE tally.unpriced_usage ADD PRIMARY KEY (customer_id, event_id, event_source);

-- Which source sent the conflicting copy (NULL: recorded before this migration).
ALTER TABLE tally.event_conflicts ADD COLUMN event_source text;

-- A tally.wallet.grant.void writes off what is left of a grant (ledger kind 'void'); a void that
-- finds nothing to write off is kept, with why, among the records that changed nothing.
ALTER TABLE tally.wallet_ledger DROP CONSTRAINT wallet_ledger_kind_check;
ALTER TABLE tally.wallet_ledger ADD CONSTRAINT wallet_ledger_kind_check CHECK (kind IN ('grant', 'usage', 'expiry', 'void'));
ALTER TABLE tally.unrateable_records DROP CONSTRAINT unrateable_records_kind_check;
ALTER TABLE tally.unrateable_records ADD CONSTRAINT unrateable_records_kind_check CHECK (kind IN ('usage', 'grant', 'void'));

-- How a topic's records are placed: the partitioner its producers hash keys with and its
-- partition count. Consumers and tally-ingest refuse to start when either differs from what is
-- recorded, so a customer is never split between partitions by an upgrade or by partitions
-- added later, and every decision about a record's placement is the same on replay.
-- A topic consumed before this migration was written by tally-ingest with librdkafka's CRC32.
CREATE TABLE tally.topic_layouts (
    topic text PRIMARY KEY,
    partitioner text NOT NULL CHECK (partitioner IN ('murmur2', 'crc32')),
    partitions integer NOT NULL CHECK (partitions > 0),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tally.topic_layouts (topic, partitioner, partitions)
SELECT topic, 'crc32', max(partition) + 1 FROM tally.consumer_offsets
WHERE consumer_group NOT LIKE 'tally-replay-%'
GROUP BY topic;

-- Keys that may name, in the gateway's customer header, whom a call is for (an application
-- trusted to say so). Other keys without a customer are refused when they name one.
ALTER TABLE tally.api_keys ADD COLUMN may_name_customer boolean NOT NULL DEFAULT false;
