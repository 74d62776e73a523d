-- Compact dedup keys (issue #27): each consumer's key is a 16-byte fingerprint of (customer,
-- source, id) instead of the three texts, in the primary key and in the row. The first 16
-- bytes of SHA-256 over each part's UTF-8 byte count (4 bytes, big-endian) and bytes; TallyCore's
-- `DedupKey.storedFingerprint` computes the same. The content hash stays, so a fingerprint
-- shared by two keys (about n² / 2^129 for n keys) shows as a conflict, not a silent drop.
-- Fixed-width columns first: no padding between them.
CREATE FUNCTION tally.dedup_key_fingerprint(customer_id text, event_source text, event_id text) RETURNS uuid
LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$  -- STABLE as convert_to is: inlined into the queries using it
    SELECT encode(substring(sha256(
        int4send(octet_length(convert_to(customer_id, 'UTF8'))) || convert_to(customer_id, 'UTF8') ||
        int4send(octet_length(convert_to(event_source, 'UTF8'))) || convert_to(event_source, 'UTF8') ||
        int4send(octet_length(convert_to(event_id, 'UTF8'))) || convert_to(event_id, 'UTF8')) FROM 1 FOR 16), 'hex')::uuid
$$;

-- Keys stored before identities had sources (migration 0014's chr(1)): under the fingerprint of
-- (customer, chr(1), id), which a consumer asks for beside the exact one while any are listed
-- here. `tally backfill-key-sources` reads each one's record, gives it its source and removes
-- it from this list.
CREATE TABLE tally.dedup_keys_without_source (
    key_table text NOT NULL CHECK (key_table IN ('usage_event_keys', 'rater_event_keys')),
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    customer_id text NOT NULL,
    event_id text NOT NULL,
    PRIMARY KEY (key_table, partition, record_offset, customer_id, event_id)
);
INSERT INTO tally.dedup_keys_without_source
SELECT 'usage_event_keys', partition, record_offset, customer_id, event_id FROM tally.usage_event_keys WHERE event_source = chr(1);
INSERT INTO tally.dedup_keys_without_source
SELECT 'rater_event_keys', partition, record_offset, customer_id, event_id FROM tally.rater_event_keys WHERE event_source = chr(1);

CREATE TABLE tally.usage_event_keys_compact (
    key_fingerprint uuid NOT NULL,
    content_hash bigint NOT NULL,
    record_offset bigint NOT NULL,
    partition integer NOT NULL,
    customer_id text COLLATE "C" NOT NULL
);
INSERT INTO tally.usage_event_keys_compact
SELECT tally.dedup_key_fingerprint(customer_id, event_source, event_id), content_hash, record_offset, partition, customer_id
FROM tally.usage_event_keys;
DROP TABLE tally.usage_event_keys;
ALTER TABLE tally.usage_event_keys_compact RENAME TO usage_event_keys;
ALTER TABLE tally.usage_event_keys ADD CONSTRAINT usage_event_keys_pkey PRIMARY KEY (key_fingerprint);

CREATE TABLE tally.rater_event_keys_compact (LIKE tally.usage_event_keys);
INSERT INTO tally.rater_event_keys_compact
SELECT tally.dedup_key_fingerprint(customer_id, event_source, event_id), content_hash, record_offset, partition, customer_id
FROM tally.rater_event_keys;
DROP TABLE tally.rater_event_keys;
ALTER TABLE tally.rater_event_keys_compact RENAME TO rater_event_keys;
ALTER TABLE tally.rater_event_keys ADD CONSTRAINT rater_event_keys_pkey PRIMARY KEY (key_fingerprint);
