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
-- LATEST is decided by event time, then log position, so a replay decides the same.
CREATE TABLE tally.meter_windows_hourly (
    customer_id text NOT NULL,
    meter text NOT NULL,
    window_start timestamptz NOT NULL,
    dimensions jsonb NOT NULL,
    aggregation text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max', 'latest')),
    value numeric NOT NULL CHECK (value >= 0),
    latest_event_time timestamptz,
    latest_partition integer,
    latest_offset bigint,
    CHECK ((aggregation = 'latest') = (latest_event_time IS NOT NULL AND latest_partition IS NOT NULL AND latest_offset IS NOT NULL)),
    PRIMARY KEY (customer_id, meter, window_start, dimensions)
) WITH (fillfactor = 70);  -- batches update their hours in place: room for HOT updates

-- The distinct values a UNIQUE_COUNT meter saw per hour: a day's or month's count is that of the
-- union of its hours' values, never a sum of hourly counts.
CREATE TABLE tally.meter_unique_values_hourly (
    customer_id text NOT NULL,
    meter text NOT NULL,
    window_start timestamptz NOT NULL,
    dimensions jsonb NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (customer_id, meter, window_start, dimensions, value)
);

-- Readings of meters the catalog did not declare when the aggregator counted their event
-- (producers other than the ingest API, which refuses them). Nothing is dropped: `tally meters
-- apply` folds the readings of a meter it declares into its windows, under the aggregator's
-- offset locks, so the windows equal those of a replay with the meter declared from the start.
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
           WHEN 'latest' THEN (array_agg(w.value ORDER BY w.latest_event_time DESC, w.latest_partition DESC, w.latest_offset DESC))[1]
           ELSE sum(w.value)
       END AS value
FROM tally.meter_windows_hourly w CROSS JOIN (VALUES ('hour'), ('day'), ('month')) AS g(granularity)
GROUP BY g.granularity, w.customer_id, w.meter, date_trunc(g.granularity, w.window_start, 'UTC'), w.dimensions, w.aggregation
UNION ALL
SELECT g.granularity, u.customer_id, u.meter, date_trunc(g.granularity, u.window_start, 'UTC'), u.dimensions,
       'unique_count', count(DISTINCT u.value)
FROM tally.meter_unique_values_hourly u CROSS JOIN (VALUES ('hour'), ('day'), ('month')) AS g(granularity)
GROUP BY g.granularity, u.customer_id, u.meter, date_trunc(g.granularity, u.window_start, 'UTC'), u.dimensions;
