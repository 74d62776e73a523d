-- Meters: named quantities events carry beside or instead of tokens (web searches, tool calls,
-- vector searches), declared in a meter catalog and folded by the aggregator into windows per
-- customer, meter and declared dimension values, in the same transaction as its offsets.

-- Every version of the meter catalog, as applied (`tally meters apply`): the canonical JSON of
-- all its meters. A version only adds meters or relabels units (MeterCatalog.refusal).
CREATE TABLE tally.meter_catalogs (
    version integer PRIMARY KEY CHECK (version > 0),
    document text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Hourly windows of SUM, COUNT, MAX and LATEST meters. `dimensions` holds the value of each
-- declared dimension ('' when the event lacks the property). Day and month follow from the hours
-- exactly (sum of sums and counts, max of maxima, the latest of the latest), in `meter_windows`.
-- LATEST is decided by event time (microseconds, exact), then log position, so a replay decides
-- the same. The key holds an MD5 of the dimensions, not the values themselves: 8 dimension
-- values of up to 1,024 characters would pass a btree entry's limit (2,704 bytes) and stop the
-- batch that carries them.
CREATE TABLE tally.meter_windows_hourly (
    customer_id text NOT NULL,
    meter text NOT NULL,
    window_start timestamptz NOT NULL,
    dimensions jsonb NOT NULL,
    aggregation text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max', 'latest')),
    value numeric NOT NULL CHECK (value >= 0),
    latest_event_us bigint,
    latest_partition integer,
    latest_offset bigint,
    CHECK ((aggregation = 'latest') = (latest_event_us IS NOT NULL AND latest_partition IS NOT NULL AND latest_offset IS NOT NULL))
) WITH (fillfactor = 70);  -- folds update the hours in place: room for HOT updates
CREATE UNIQUE INDEX meter_windows_hourly_key ON tally.meter_windows_hourly (customer_id, meter, window_start, md5(dimensions::text));
-- All customers' windows of one meter (tally usage --meter without --customer, dashboards).
CREATE INDEX meter_windows_hourly_meter ON tally.meter_windows_hourly (meter, window_start);

-- The distinct values a UNIQUE_COUNT meter saw per hour: a day's or month's count is that of the
-- union of its hours' values, never a sum of hourly counts.
-- Keyed by MD5s of the dimensions and the value, for the entry size limit: two distinct values
-- with one MD5 would count once (a deliberate collision at worst; no accidental one is known).
CREATE TABLE tally.meter_unique_values_hourly (
    customer_id text NOT NULL,
    meter text NOT NULL,
    window_start timestamptz NOT NULL,
    dimensions jsonb NOT NULL,
    value text NOT NULL
);
CREATE UNIQUE INDEX meter_unique_values_hourly_key ON tally.meter_unique_values_hourly
    (customer_id, meter, window_start, md5(dimensions::text), md5(value));

-- What batches add, appended without an index (one COPY per batch) and folded into the two
-- tables above in bulk with the token window deltas (AggregatorStore.fold), as migration 0012
-- does for tokens: upserting every touched window in every batch cost more than the rest of a
-- batch's meter work. Readers see the union (`meter_windows`), so a fold changes no figure.
-- The same checks as the folded table, so a row no fold could merge fails its own batch rather
-- than every fold after it (which would hold up the token folds too).
CREATE TABLE tally.meter_window_deltas (
    customer_id text NOT NULL,
    meter text NOT NULL,
    window_start timestamptz NOT NULL,
    dimensions jsonb NOT NULL,
    aggregation text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max', 'latest')),
    value numeric NOT NULL CHECK (value >= 0),
    latest_event_us bigint,
    latest_partition integer,
    latest_offset bigint,
    CHECK ((aggregation = 'latest') = (latest_event_us IS NOT NULL AND latest_partition IS NOT NULL AND latest_offset IS NOT NULL))
);
CREATE TABLE tally.meter_unique_value_deltas (
    customer_id text NOT NULL,
    meter text NOT NULL,
    window_start timestamptz NOT NULL,
    dimensions jsonb NOT NULL,
    value text NOT NULL
);

-- Readings of meters the catalog did not declare when the aggregator counted their event
-- (producers other than the ingest API, which refuses them). Nothing is dropped: `tally meters
-- apply` folds the readings of a meter it declares into its windows, holding the lock every
-- batch with meters takes shared, so the windows equal a replay's with the meter declared from
-- the start.
CREATE TABLE tally.meter_undeclared_readings (
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    meter text NOT NULL,
    customer_id text NOT NULL,
    event_id text NOT NULL,
    event_time timestamptz NOT NULL,
    quantity bigint NOT NULL CHECK (quantity >= 0),
    properties jsonb NOT NULL,
    PRIMARY KEY (partition, record_offset, meter)
);
CREATE INDEX meter_undeclared_readings_meter ON tally.meter_undeclared_readings (meter);

-- Every meter window at every granularity: one row per (granularity, customer, meter, window,
-- dimension values), `value` being the window's figure in the meter's unit.
CREATE VIEW tally.meter_windows AS
SELECT g.granularity, w.customer_id, w.meter, date_trunc(g.granularity, w.window_start, 'UTC') AS window_start, w.dimensions,
       w.aggregation,
       CASE w.aggregation
           WHEN 'max' THEN max(w.value)
           WHEN 'latest' THEN (array_agg(w.value ORDER BY w.latest_event_us DESC, w.latest_partition DESC, w.latest_offset DESC))[1]
           ELSE sum(w.value)
       END AS value
FROM (SELECT customer_id, meter, window_start, dimensions, aggregation, value, latest_event_us, latest_partition, latest_offset
      FROM tally.meter_windows_hourly
      UNION ALL
      SELECT customer_id, meter, window_start, dimensions, aggregation, value, latest_event_us, latest_partition, latest_offset
      FROM tally.meter_window_deltas) w
     CROSS JOIN (VALUES ('hour'), ('day'), ('month')) AS g(granularity)
GROUP BY g.granularity, w.customer_id, w.meter, date_trunc(g.granularity, w.window_start, 'UTC'), w.dimensions, w.aggregation
UNION ALL
SELECT g.granularity, u.customer_id, u.meter, date_trunc(g.granularity, u.window_start, 'UTC'), u.dimensions,
       'unique_count', count(DISTINCT u.value)
FROM (SELECT customer_id, meter, window_start, dimensions, value FROM tally.meter_unique_values_hourly
      UNION ALL
      SELECT customer_id, meter, window_start, dimensions, value FROM tally.meter_unique_value_deltas) u
     CROSS JOIN (VALUES ('hour'), ('day'), ('month')) AS g(granularity)
GROUP BY g.granularity, u.customer_id, u.meter, date_trunc(g.granularity, u.window_start, 'UTC'), u.dimensions;
