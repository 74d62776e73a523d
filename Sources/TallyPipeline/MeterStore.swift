import Foundation
import TallyCore
import TallyPostgres

/// One stored version of the meter catalog.
public struct MeterCatalogVersion: Sendable {
    public let version: Int
    public let appliedAt: String
    public let catalog: MeterCatalog
}

/// What `MeterCatalogStore.apply` did.
public struct MeterCatalogApplied: Sendable {
    /// The version now in force.
    public let version: Int
    /// False when the catalog equals the latest version (applying a file twice changes nothing).
    public let created: Bool
    /// Readings counted while their meter was undeclared, now folded into its windows.
    public let foldedReadings: Int
}

/// Why a meter catalog was not applied.
public struct MeterCatalogRefusal: Error, CustomStringConvertible {
    public let description: String
}

/// The meter catalog's versions in PostgreSQL (`tally meters apply`, `tally meters list`).
public struct MeterCatalogStore {
    public let connection: PostgresConnection

    public init(connection: PostgresConnection) { self.connection = connection }

    /// Every version, oldest first.
    public func versions() throws -> [MeterCatalogVersion] {
        let result = try connection.query("""
            SELECT version, to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), document FROM meter_catalogs ORDER BY version
            """)
        return try (0..<result.rowCount).map { row in
            MeterCatalogVersion(version: Int(try result.value(row, 0, as: Int64.self)), appliedAt: try result.value(row, 1, as: String.self),
                                catalog: try MeterCatalog.parse(try result.value(row, 2, as: String.self)))
        }
    }

    /// The catalog in force, or nil before the first `tally meters apply`.
    public func latest() throws -> MeterCatalogVersion? {
        let result = try connection.query("""
            SELECT version, to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), document FROM meter_catalogs ORDER BY version DESC LIMIT 1
            """)
        guard result.rowCount == 1 else { return nil }
        return MeterCatalogVersion(version: Int(try result.value(0, 0, as: Int64.self)), appliedAt: try result.value(0, 1, as: String.self),
                                   catalog: try MeterCatalog.parse(try result.value(0, 2, as: String.self)))
    }

    /// Taken exclusively by `apply` and shared by each aggregator batch with meters before it
    /// reads the catalog (any constant works; this one spells "tallymet").
    static let catalogLock: Int64 = 0x7461_6c6c_796d_6574

    /// The latest version's number, 0 before the first apply: a cheap check for a change.
    public func latestVersion() throws -> Int {
        Int(try connection.query("SELECT coalesce(max(version), 0) FROM meter_catalogs").value(0, 0, as: Int64.self))
    }

    /// Stores `catalog` as the next version. The readings the aggregator kept while a meter was
    /// undeclared are folded into its windows in the same transaction, which holds the lock every
    /// batch with meters takes (shared) before it reads the catalog, so no batch commits in
    /// between: the windows are those a replay with the meter declared from the start builds.
    ///
    /// Throws `MeterCatalogRefusal` when the catalog drops or changes a declared meter, or
    /// while a replay's shadow schema exists (its readings would be folded by no one).
    public func apply(_ catalog: MeterCatalog) throws -> MeterCatalogApplied {
        try connection.transaction { connection in
            try connection.query("SELECT pg_advisory_xact_lock($1)", [Self.catalogLock])
            let previous = try MeterCatalogStore(connection: connection).latest()
            if let previous, previous.catalog == catalog { return MeterCatalogApplied(version: previous.version, created: false, foldedReadings: 0) }
            if let previous, let refusal = catalog.refusal(following: previous.catalog) { throw MeterCatalogRefusal(description: refusal) }
            let replays = try connection.query("""
                SELECT table_schema FROM information_schema.tables
                WHERE table_name = 'meter_undeclared_readings' AND table_schema <> 'tally' ORDER BY 1
                """).rows.compactMap { $0[0] }
            if !replays.isEmpty {
                throw MeterCatalogRefusal(description: "a replay is running in schema \(replays.joined(separator: ", ")): finish or drop it (tally replay --drop), then apply")
            }
            let version = (previous?.version ?? 0) + 1
            try connection.query("INSERT INTO meter_catalogs (version, document) VALUES ($1, $2)", [version, catalog.canonicalJSON])
            let declared = catalog.meters.keys.sorted()
            let readings = try MeterWindowWriter.undeclaredReadings(of: declared, on: connection)
            // As deltas, which the aggregator's next fold merges; readers see them at once.
            _ = try MeterWindowWriter.appendDeltas(MeterWindows.fold(readings, catalog: catalog, granularities: [.hour]), catalog: catalog, on: connection)
            try connection.query("DELETE FROM meter_undeclared_readings WHERE meter = ANY($1::text[])", [PostgresArray(declared)])
            return MeterCatalogApplied(version: version, created: true, foldedReadings: readings.count)
        }
    }
}

/// The aggregator's meter windows: folds the readings of a batch's counted events into hourly
/// windows and appends them to `meter_window_deltas` and `meter_unique_value_deltas` inside the
/// batch's transaction (folded into `meter_windows_hourly` and `meter_unique_values_hourly` in
/// bulk, `AggregatorStore.fold`), and keeps readings of undeclared meters aside.
public final class MeterWindowWriter {
    private let connection: PostgresConnection
    private var catalog = MeterCatalog([])
    private var catalogVersion = 0
    /// Distinct values of UNIQUE_COUNT meters that committed batches of this process stored, per
    /// hourly window. A window keeps a set, so a value it has needs no delta row again: an agent
    /// product's end users come back all hour, and writing and folding each again cost more than
    /// the rest of its meters. Values never leave the tables while consumers run (a promotion
    /// hands over a state built from the same records up to offsets no smaller; a reset deletes
    /// the offsets too, so the next batch fails its offset check), and this is cleared on any
    /// outcome but a commit, on every assignment and when a partition's `state_version` moves (a
    /// promotion, whose replay may have read a log that no longer starts at offset 0), so a
    /// value here is always stored.
    private var storedUniques = Set<StoredUniqueValue>()
    /// What the batch being committed adds to `storedUniques` once it has committed.
    private var pendingUniques: [StoredUniqueValue] = []
    /// The partitions' `state_version`s the stored values were learned under.
    private var knownStateVersions: [Int32: Int64] = [:]
    /// Past this many values the set starts over (at roughly 100 bytes a value).
    static let storedUniquesLimit = 500_000

    private struct StoredUniqueValue: Hashable {
        let window: MeterWindowKey
        let value: ExactText
    }

    public init(connection: PostgresConnection) { self.connection = connection }

    /// A batch's meter windows, folded by `fold` and written by `append`.
    struct FoldedBatch {
        var windows: [MeterWindowKey: MeterWindowValue]
        let undeclared: [(reading: MeterReading, eventID: String)]
    }

    /// Step one of a batch with meters, called inside the batch's transaction after its offset
    /// rows are locked, so the catalog read is the one no `tally meters apply` can change before
    /// the batch commits. Returns false, reading nothing, for a token-only batch.
    func loadCatalog(for accepted: [PositionedEvent]) throws -> Bool {
        pendingUniques.removeAll()
        // Token-only batches pay nothing for meters.
        guard accepted.contains(where: { !$0.event.meters.isEmpty }) else { return false }
        // Released at COMMIT: no apply changes the catalog between this read and this batch's commit.
        try connection.query("SELECT pg_advisory_xact_lock_shared($1)", [MeterCatalogStore.catalogLock])
        let version = try MeterCatalogStore(connection: connection).latestVersion()
        if version != catalogVersion {
            catalog = try MeterCatalogStore(connection: connection).latest()?.catalog ?? MeterCatalog([])
            catalogVersion = version
        }
        return true
    }

    /// Step two: the counted events' readings folded into hourly windows, less the unique values
    /// committed batches stored. Uses no connection, so it runs while the server stores the
    /// batch's keys.
    func fold(_ accepted: [PositionedEvent]) -> FoldedBatch {
        var (windows, undeclared) = MeterWindows.foldHours(accepted, catalog: catalog)
        for (key, value) in windows {
            guard case .unique(let values) = value else { continue }
            let new = values.filter { !storedUniques.contains(StoredUniqueValue(window: key, value: $0)) }
            if new.count < values.count { windows[key] = new.isEmpty ? nil : .unique(new) }
            pendingUniques += new.map { StoredUniqueValue(window: key, value: $0) }
        }
        return FoldedBatch(windows: windows, undeclared: undeclared)
    }

    /// Step three, in the batch's transaction: appends the folded windows as delta rows and keeps
    /// undeclared readings aside. Returns the delta rows it appended.
    func append(_ folded: FoldedBatch) throws -> Int {
        let appended = try Self.appendDeltas(folded.windows, catalog: catalog, on: connection)
        if !folded.undeclared.isEmpty { try Self.storeUndeclared(folded.undeclared, on: connection) }
        return appended
    }

    /// The batch `fold` saw has committed: its unique values are stored.
    func batchCommitted() {
        if storedUniques.count + pendingUniques.count > Self.storedUniquesLimit { storedUniques.removeAll() }
        storedUniques.formUnion(pendingUniques)
        pendingUniques.removeAll()
    }

    /// The batch did not commit, or the partitions changed hands: nothing is known stored.
    func forgetStoredValues() {
        storedUniques.removeAll()
        pendingUniques.removeAll()
        knownStateVersions.removeAll()
    }

    /// The batch's partitions' `state_version`s, read with their offset rows locked.
    func stateVersions(_ versions: [Int32: Int64]) {
        if versions.contains(where: { partition, version in knownStateVersions[partition].map { $0 != version } ?? false }) {
            storedUniques.removeAll()
        }
        knownStateVersions.merge(versions) { $1 }
    }

    /// One COPY per table, into tables without an index: the cheap part of a batch.
    static func appendDeltas(_ windows: [MeterWindowKey: MeterWindowValue], catalog: MeterCatalog, on connection: PostgresConnection) throws -> Int {
        var rows: [(key: MeterWindowKey, dimensions: String, value: MeterWindowValue)] = []
        var unique: [(key: MeterWindowKey, dimensions: String, value: String)] = []
        rows.reserveCapacity(windows.count)
        for (key, value) in windows {
            guard let meter = catalog.meters[key.meter] else { continue }
            let dimensions = MeterWindows.dimensionsJSON(key, meter)
            if case .unique(let values) = value {
                for distinct in values { unique.append((key, dimensions, distinct.text)) }
            } else {
                rows.append((key, dimensions, value))
            }
        }
        if !rows.isEmpty {
            try connection.copyIn("""
                COPY meter_window_deltas (customer_id, meter, window_start, dimensions, aggregation, value, latest_event_us, latest_partition,
                    latest_offset) FROM STDIN
                """, format: .text, rows: rows) { row, fields in
                fields.add(row.key.customerID)
                fields.add(row.key.meter)
                fields.add(EventTime.format(microseconds: row.key.start))
                fields.add(row.dimensions)
                fields.add(Self.aggregation(row.value))
                fields.add(String(row.value.result))
                if case .latest(let time, let position, _) = row.value {
                    fields.add(time)
                    fields.add(position.partition)
                    fields.add(position.offset)
                } else {
                    fields.addNull()
                    fields.addNull()
                    fields.addNull()
                }
            }
        }
        if !unique.isEmpty {
            try connection.copyIn("COPY meter_unique_value_deltas (customer_id, meter, window_start, dimensions, value) FROM STDIN",
                                  format: .text, rows: unique) { row, fields in
                fields.add(row.key.customerID)
                fields.add(row.key.meter)
                fields.add(EventTime.format(microseconds: row.key.start))
                fields.add(row.dimensions)
                fields.add(row.value)
            }
        }
        return rows.count + unique.count
    }

    static func aggregation(_ value: MeterWindowValue) -> String {
        switch value {
        case .sum: "sum"
        case .count: "count"
        case .max: "max"
        case .latest: "latest"
        case .unique: "unique_count"
        }
    }

    /// Moves every meter delta row into the hourly tables, merged per window, then deletes them;
    /// run by `AggregatorStore.fold` in a REPEATABLE READ transaction of its own.
    static func foldDeltas(on connection: PostgresConnection) throws {
        try connection.query("""
            INSERT INTO meter_windows_hourly AS w (customer_id, meter, window_start, dimensions, aggregation, value)
            SELECT customer_id, meter, window_start, dimensions, aggregation, CASE aggregation WHEN 'max' THEN max(value) ELSE sum(value) END
            FROM meter_window_deltas WHERE aggregation <> 'latest'
            GROUP BY customer_id, meter, window_start, dimensions, aggregation
            ON CONFLICT (customer_id, meter, window_start, md5(dimensions::text)) DO UPDATE SET
                value = CASE w.aggregation WHEN 'max' THEN greatest(w.value, EXCLUDED.value) ELSE w.value + EXCLUDED.value END
            """)
        try connection.query("""
            INSERT INTO meter_windows_hourly AS w (customer_id, meter, window_start, dimensions, aggregation, value,
                latest_event_us, latest_partition, latest_offset)
            SELECT DISTINCT ON (customer_id, meter, window_start, md5(dimensions::text))
                   customer_id, meter, window_start, dimensions, aggregation, value, latest_event_us, latest_partition, latest_offset
            FROM meter_window_deltas WHERE aggregation = 'latest'
            ORDER BY customer_id, meter, window_start, md5(dimensions::text), latest_event_us DESC, latest_partition DESC, latest_offset DESC
            ON CONFLICT (customer_id, meter, window_start, md5(dimensions::text)) DO UPDATE SET
                value = CASE WHEN \(newer) THEN EXCLUDED.value ELSE w.value END,
                latest_event_us = CASE WHEN \(newer) THEN EXCLUDED.latest_event_us ELSE w.latest_event_us END,
                latest_partition = CASE WHEN \(newer) THEN EXCLUDED.latest_partition ELSE w.latest_partition END,
                latest_offset = CASE WHEN \(newer) THEN EXCLUDED.latest_offset ELSE w.latest_offset END
            """)
        // No DISTINCT: DO NOTHING skips a row equal to one this statement inserted, and sorting
        // the deltas first cost more than the inserts.
        try connection.query("""
            INSERT INTO meter_unique_values_hourly (customer_id, meter, window_start, dimensions, value)
            SELECT customer_id, meter, window_start, dimensions, value FROM meter_unique_value_deltas
            ON CONFLICT DO NOTHING
            """)
        try connection.query("DELETE FROM meter_window_deltas")
        try connection.query("DELETE FROM meter_unique_value_deltas")
    }

    /// The hourly windows in `schema`, folded or not, one row per window as a fold leaves it:
    /// for checksums, which must not depend on when folds ran.
    public static func hourlyWindowsQuery(schema: SQLIdentifier) -> String {
        let columns = "customer_id, meter, window_start, dimensions, aggregation, value, latest_event_us, latest_partition, latest_offset"
        let order = "ORDER BY latest_event_us DESC, latest_partition DESC, latest_offset DESC"
        return """
            SELECT customer_id, meter, window_start, dimensions, aggregation,
                   CASE aggregation WHEN 'max' THEN max(value) WHEN 'latest' THEN (array_agg(value \(order)))[1] ELSE sum(value) END AS value,
                   (array_agg(latest_event_us \(order)))[1] AS latest_event_us, (array_agg(latest_partition \(order)))[1] AS latest_partition,
                   (array_agg(latest_offset \(order)))[1] AS latest_offset
            FROM (SELECT \(columns) FROM \(schema).meter_windows_hourly UNION ALL SELECT \(columns) FROM \(schema).meter_window_deltas) w
            GROUP BY customer_id, meter, window_start, dimensions, aggregation
            """
    }

    /// The distinct values in `schema`, folded or not.
    public static func uniqueValuesQuery(schema: SQLIdentifier) -> String {
        let columns = "customer_id, meter, window_start, dimensions, value"
        return "SELECT DISTINCT \(columns) FROM (SELECT \(columns) FROM \(schema).meter_unique_values_hourly UNION ALL SELECT \(columns) FROM \(schema).meter_unique_value_deltas) u"
    }

    /// The stored LATEST reading is older than the incoming one (NULL, so false, for other kinds).
    private static let newer = "(EXCLUDED.latest_event_us, EXCLUDED.latest_partition, EXCLUDED.latest_offset) > (w.latest_event_us, w.latest_partition, w.latest_offset)"

    private static func storeUndeclared(_ undeclared: [(reading: MeterReading, eventID: String)], on connection: PostgresConnection) throws {
        let readings = undeclared.map(\.reading)
        func json(_ properties: [String: String]) -> String {
            var json = JSONWriter(capacity: 64)
            json.raw("{")
            for (index, (name, value)) in properties.sorted(by: { $0.key < $1.key }).enumerated() { json.key(name, first: index == 0); json.string(value) }
            json.raw("}")
            return String(decoding: json.bytes, as: UTF8.self)
        }
        // Idempotent by log position: a batch sent again after a lost commit reply adds nothing.
        try connection.query(bound: """
            INSERT INTO meter_undeclared_readings (partition, record_offset, meter, customer_id, event_id, event_time, quantity, properties)
            SELECT p, o, m, c, e, \(unescaped: microsecondsToTimestamp) t, q, j::jsonb
            FROM unnest(\(PostgresArray(readings.map(\.position.partition)))::int[], \(PostgresArray(readings.map(\.position.offset)))::bigint[],
                        \(PostgresArray(readings.map(\.meter)))::text[], \(PostgresArray(readings.map(\.customerID)))::text[],
                        \(PostgresArray(undeclared.map(\.eventID)))::text[], \(PostgresArray(readings.map(\.time)))::bigint[],
                        \(PostgresArray(readings.map(\.quantity)))::bigint[], \(PostgresArray(readings.map { json($0.properties) }))::text[])
                 AS x(p, o, m, c, e, t, q, j)
            ON CONFLICT DO NOTHING
            """)
    }

    /// The kept readings of `meters`, in log order.
    static func undeclaredReadings(of meters: [String], on connection: PostgresConnection) throws -> [MeterReading] {
        guard !meters.isEmpty else { return [] }
        let result = try connection.query("""
            SELECT meter, customer_id, \(microseconds("event_time")), partition, record_offset, quantity, properties::text
            FROM meter_undeclared_readings WHERE meter = ANY($1::text[]) ORDER BY partition, record_offset, meter
            """, [PostgresArray(meters)])
        return try (0..<result.rowCount).map { row in
            var properties: [String: String] = [:]
            if case .success(.object(let members)) = JSONValue.parse(Array(try result.value(row, 6, as: String.self).utf8)) {
                for case (let name, .string(let value)) in members { properties[name] = value }
            }
            return MeterReading(meter: try result.value(row, 0, as: String.self), customerID: try result.value(row, 1, as: String.self),
                                time: try result.value(row, 2, as: Int64.self),
                                position: LogPosition(partition: Int32(try result.value(row, 3, as: Int64.self)), offset: try result.value(row, 4, as: Int64.self)),
                                quantity: try result.value(row, 5, as: Int64.self), properties: properties)
        }
    }
}

/// One row of a meter usage query: a window, its customer, the chosen dimensions' values.
public struct MeterUsageRow: Sendable, Equatable {
    /// RFC 3339 (UTC) start of the window.
    public let windowStart: String
    public let customerID: String
    /// The values of the dimensions grouped by, in the order asked.
    public let dimensions: [String]
    /// The window's figure, in the meter's unit.
    public let value: String
}

/// Meter windows at any granularity and grouping, each exact: read from the hourly rows and
/// the unique values themselves, so a day's UNIQUE_COUNT with a dimension collapsed is the
/// count of the union, and a LATEST is the latest reading's across the collapsed windows.
public enum MeterUsageQuery {
    public enum Failure: Error, CustomStringConvertible {
        case unknownMeter(String)
        case notADimension(meter: String, name: String, declared: [String])

        public var description: String {
            switch self {
            case .unknownMeter(let name): "meter \(name) is not declared (tally meters list)"
            case .notADimension(let meter, let name, let declared):
                "\(name) is not a dimension of meter \(meter): it declares \(declared.isEmpty ? "none" : declared.joined(separator: ", "))"
            }
        }
    }

    /// - Parameters:
    ///   - granularity: window size; windows start at UTC hour, day or month boundaries.
    ///   - from, to: RFC 3339; windows overlapping [from, to), each whole.
    ///   - groupBy: dimension names the meter declares; the others are collapsed.
    /// - Throws: `Failure` for an undeclared meter or dimension, `PostgresError`.
    public static func run(_ connection: PostgresConnection, meter name: String, granularity: Granularity, customerID: String? = nil,
                           from: String? = nil, to: String? = nil, groupBy: [String] = []) throws -> [MeterUsageRow] {
        guard let meter = try MeterCatalogStore(connection: connection).latest()?.catalog.meters[name] else { throw Failure.unknownMeter(name) }
        for dimension in groupBy where !meter.dimensions.contains(dimension) {
            throw Failure.notADimension(meter: name, name: dimension, declared: meter.dimensions)
        }
        let unit = switch granularity {
        case .hour: "hour"
        case .day: "day"
        case .month: "month"
        }
        let figure = switch meter.aggregation {
        case .sum, .count: "sum(value)"
        case .max: "max(value)"
        case .latest: "(array_agg(value ORDER BY latest_event_us DESC, latest_partition DESC, latest_offset DESC))[1]"
        case .uniqueCount: "count(DISTINCT value)"
        }
        // Folded rows and the deltas not folded yet.
        let source = if case .uniqueCount = meter.aggregation {
            "(SELECT customer_id, meter, window_start, dimensions, value FROM meter_unique_values_hourly UNION ALL "
                + "SELECT customer_id, meter, window_start, dimensions, value FROM meter_unique_value_deltas) u"
        } else {
            "(SELECT customer_id, meter, window_start, dimensions, value, latest_event_us, latest_partition, latest_offset FROM meter_windows_hourly UNION ALL "
                + "SELECT customer_id, meter, window_start, dimensions, value, latest_event_us, latest_partition, latest_offset FROM meter_window_deltas) w"
        }
        // The chosen dimensions' values as one JSON array, in the order asked.
        let query: PostgresQuery = """
            SELECT to_char(date_trunc(\(unit)::text, window_start, 'UTC') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), customer_id,
                   (SELECT jsonb_agg(dimensions->d ORDER BY n) FROM unnest(\(PostgresArray(groupBy))::text[]) WITH ORDINALITY AS x(d, n)),
                   \(unescaped: figure)::text
            FROM \(unescaped: source)
            WHERE meter = \(name) AND (\(customerID)::text IS NULL OR customer_id = \(customerID)::text)
              AND (\(from)::timestamptz IS NULL OR date_trunc(\(unit)::text, window_start, 'UTC') >= date_trunc(\(unit)::text, \(from)::timestamptz, 'UTC'))
              AND (\(to)::timestamptz IS NULL OR date_trunc(\(unit)::text, window_start, 'UTC') < \(to)::timestamptz)
            GROUP BY 1, 2, 3 ORDER BY 2, 1, 3
            """
        let result = try connection.query(bound: query)
        return try (0..<result.rowCount).map { row in
            var values: [String] = []
            if let text = result.string(row, 2), case .success(.array(let elements)) = JSONValue.parse(Array(text.utf8)) {
                values = elements.map { if case .string(let value) = $0 { value } else { "" } }
            }
            return MeterUsageRow(windowStart: try result.value(row, 0, as: String.self), customerID: try result.value(row, 1, as: String.self),
                                 dimensions: values, value: try result.value(row, 3, as: String.self))
        }
    }
}
