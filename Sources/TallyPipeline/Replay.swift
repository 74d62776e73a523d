import Logging
import TallyCore
import TallyPostgres

/// A consumer whose state can be rebuilt from the log.
public enum ReplayedConsumer: String, Sendable, CaseIterable {
    case aggregator, rater

    /// The live consumer group whose state this is.
    public var liveGroup: String { "tally-\(rawValue)" }

    /// Its dedup-key table: which customers a partition holds.
    public var keysTable: String { self == .aggregator ? "usage_event_keys" : "rater_event_keys" }

    /// The tables the consumer writes (its state), the shared bookkeeping ones included.
    public var tables: [String] {
        let shared = ["consumer_offsets", "dead_letters", "event_conflicts"]
        switch self {
        case .aggregator: return shared + ["usage_event_keys", "usage_windows_hourly", "usage_window_deltas", "meter_windows_hourly",
                                           "meter_window_deltas", "meter_unique_values_hourly", "meter_unique_value_deltas", "meter_undeclared_readings"]
        case .rater: return shared + ["rater_event_keys", "rated_usage", "unpriced_usage", "unrateable_records", "wallet_ledger", "wallet_overage", "wallet_grants", "wallets",
                                      "balance_alerts", "topup_requests", "budgets", "budget_usage", "budget_alerts"]
        }
    }
}

/// A schema beside `tally` holding a replayed copy of one consumer's tables. Everything else
/// (customers, price books unless replaced) resolves to `tally` through the search path.
public struct ShadowSchema: Sendable {
    public let name: String
    public let consumer: ReplayedConsumer

    /// The schema's name for SQL text.
    public var schema: SQLIdentifier { SQLIdentifier(name) }

    public init(name: String, consumer: ReplayedConsumer) {
        self.name = name
        self.consumer = consumer
    }

    /// The search path a replay's connection uses.
    public var searchPath: String { "\(schema), tally" }

    /// Creates the empty tables; with `pricing`, also a copy of the price books with that book
    /// applied on top, so that only the replay sees it. Returns the version it got there.
    public func create(on connection: PostgresConnection, databaseURL: String, pricing: PriceBook? = nil) throws -> Int? {
        try connection.transaction { connection in
            try connection.execute(script: "CREATE SCHEMA \(schema)")
            // Operational tables too, so a replay's rows vanish with its schema.
            for table in consumer.tables + (consumer == .aggregator ? ["ingest_latency"] : []) {
                try connection.execute(script: "CREATE TABLE \(schema.qualifying(table)) (LIKE \(SQLIdentifier.tally.qualifying(table)) INCLUDING ALL)")
                // LIKE leaves storage parameters behind; the fill factors that keep updates HOT
                // matter as much to a replay as to the live consumer.
                if let options = try connection.query("""
                    SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = $1::regclass
                    """, [SQLIdentifier.tally.qualifying(table).description]).scalar {
                    try connection.execute(script: "ALTER TABLE \(schema.qualifying(table)) SET (\(options))")
                }
            }
            if pricing != nil {
                try connection.execute(script: """
                    CREATE TABLE \(schema).price_books (LIKE tally.price_books INCLUDING ALL);
                    INSERT INTO \(schema).price_books SELECT * FROM tally.price_books;
                    """)
            }
        }
        guard let pricing else { return nil }
        let shadow = try PostgresConnection(url: databaseURL, logger: Logger(label: "tally.replay"), searchPath: searchPath)
        return try BillingCatalogStore(connection: shadow).apply(pricing).version
    }

    public func drop(on connection: PostgresConnection) throws {
        try connection.execute(script: "DROP SCHEMA IF EXISTS \(schema) CASCADE")
    }
}

/// Claims only some partitions: a replay of a partition subset leaves the others' records unread
/// (they are fetched and skipped, never counted or committed).
public final class PartitionSubsetStore: ConsumerStore, @unchecked Sendable {
    private let inner: any ConsumerStore
    private let partitions: Set<Int32>

    public init(_ inner: any ConsumerStore, partitions: Set<Int32>) {
        self.inner = inner
        self.partitions = partitions
    }

    public func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] {
        try inner.claim(partitions.filter { self.partitions.contains($0) })
    }

    public func commit(_ batch: PreparedBatch) throws -> CommitOutcome { try inner.commit(batch) }

    public func idleUpkeep() throws { try inner.idleUpkeep() }
    public func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        try inner.recordLogGap(partition: partition, storedOffset: storedOffset, logEnd: logEnd)
    }
    public func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] { try inner.recordedLogGaps(partitions) }
}

/// One table's fingerprint: row count and an md5 over its rows in a fixed order, leaving out
/// what differs between runs without being state (wall-clock stamps, instance ids, group names).
public struct TableChecksum: Sendable, Equatable {
    public let table: String
    /// nil: the whole table (or the rows of the chosen partitions).
    public let partition: Int32?
    public let rows: Int64
    public let md5: String
}

public enum StateChecksum {
    static let volatileColumns = ["committed_at", "recorded_at", "published_at", "webhook_at", "owner_epoch", "owner_instance", "state_version", "consumer_group", "id"]

    /// Checksums of a consumer's tables in `schema`, per table and, where a table has a
    /// partition column, per partition. `group` selects the rows of shared tables.
    public static func compute(_ connection: PostgresConnection, schema: SQLIdentifier, consumer: ReplayedConsumer, group: String,
                               partitions: Set<Int32>? = nil, perPartition: Bool = true) throws -> [TableChecksum] {
        var sums: [TableChecksum] = []
        // Window deltas are summed into the windows: when folds ran is not state.
        for table in consumer.tables where !["usage_window_deltas", "meter_window_deltas", "meter_unique_value_deltas"].contains(table) {
            let columns = try connection.query("""
                SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2
                """, [schema.name, table]).rows.compactMap { $0[0] }
            let hasPartition = columns.contains("partition")
            var conditions: [String] = []
            var parameters: [(any PostgresEncodable)?] = []
            func bind(_ value: any PostgresEncodable) -> String {
                parameters.append(value)
                return "$\(parameters.count)"
            }
            if columns.contains("consumer_group") { conditions.append("consumer_group = \(bind(group))") }
            if let partitions, hasPartition { conditions.append("partition = ANY(\(bind(PostgresArray(partitions.sorted())))::int[])") }
            // Rows of tables keyed by customer only: the customers the chosen partitions hold.
            if let partitions, !hasPartition, columns.contains("customer_id") {
                conditions.append("customer_id IN (SELECT customer_id FROM \(schema.qualifying(consumer.keysTable)) WHERE partition = ANY(\(bind(PostgresArray(partitions.sorted())))::int[]))")
            }
            let filter = conditions.isEmpty ? "" : "WHERE " + conditions.joined(separator: " AND ")
            let removed = volatileColumns.filter(columns.contains).map { "'\($0)'" }
            let rowText = removed.isEmpty ? "to_jsonb(t)::text" : "(to_jsonb(t) - ARRAY[\(removed.joined(separator: ","))]::text[])::text"
            let grouping = hasPartition && perPartition ? "partition" : "NULL::int"
            let source = switch table {
            case "usage_windows_hourly": "(\(AggregatorStore.windowsQuery(schema: schema)))"
            case "meter_windows_hourly": "(\(MeterWindowWriter.hourlyWindowsQuery(schema: schema)))"
            case "meter_unique_values_hourly": "(\(MeterWindowWriter.uniqueValuesQuery(schema: schema)))"
            default: "\(schema.qualifying(table))"
            }
            let result = try connection.query("""
                SELECT \(grouping), count(*), md5(coalesce(string_agg(row_text, '|' ORDER BY row_text), ''))
                FROM (SELECT \(hasPartition ? "partition" : "NULL::int AS partition"), \(rowText) AS row_text FROM \(source) t \(filter)) rows
                GROUP BY 1 ORDER BY 1
                """, parameters)
            if result.rowCount == 0 { sums.append(TableChecksum(table: table, partition: nil, rows: 0, md5: "d41d8cd98f00b204e9800998ecf8427e")) }
            for row in 0..<result.rowCount {
                sums.append(TableChecksum(table: table, partition: try result.int64(row, 0).map(Int32.init), rows: try result.value(row, 1, as: Int64.self),
                                          md5: try result.value(row, 2, as: String.self)))
            }
        }
        return sums
    }
}

/// One line of a replay report: live versus replayed figures of one customer's line item.
public struct ReplayDifference: Sendable {
    public let customerID: String
    /// "2026-11 gpt-4o output" (rater) or "gpt-4o" (aggregator).
    public let item: String
    public let measure: String
    /// Window sums pass `Int64` (`UsageMeasures`): compared in 128 bits.
    public let live: Int128
    public let replayed: Int128
    public var difference: Int128 { replayed - live }
}

public enum ReplayDiff {
    /// Differences between `tally` and the shadow schema, per customer and line item, for the
    /// customers the chosen partitions hold (all when nil).
    public static func compute(_ connection: PostgresConnection, shadow: ShadowSchema, partitions: Set<Int32>?) throws -> [ReplayDifference] {
        let consumer = shadow.consumer
        // $1 empty: every customer.
        let scope = """
            (cardinality($1::int[]) = 0 OR customer_id IN
               (SELECT customer_id FROM \(shadow.schema.qualifying(consumer.keysTable)) WHERE partition = ANY($1::int[])
                UNION SELECT customer_id FROM \(SQLIdentifier.tally.qualifying(consumer.keysTable)) WHERE partition = ANY($1::int[])))
            """
        let parameters: [(any PostgresEncodable)?] = [PostgresArray((partitions ?? []).sorted())]
        var differences: [ReplayDifference] = []
        func collect(_ sql: String, measures: [String]) throws {
            let result = try connection.query(sql, parameters)
            for row in 0..<result.rowCount {
                for (index, measure) in measures.enumerated() {
                    let live = try result.int128(row, 2 + 2 * index) ?? 0
                    let replayed = try result.int128(row, 3 + 2 * index) ?? 0
                    if live != replayed {
                        differences.append(ReplayDifference(customerID: try result.value(row, 0, as: String.self), item: try result.value(row, 1, as: String.self), measure: measure,
                                                            live: live, replayed: replayed))
                    }
                }
            }
        }
        switch consumer {
        case .rater:
            // Per line item across price book versions: a pricing change moves usage to the new version.
            let items = { (schema: SQLIdentifier) in """
                SELECT customer_id, to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM') || ' ' || model || ' ' || token_type
                           || CASE WHEN context_above > 0 THEN ' above ' || context_above ELSE '' END
                           || CASE WHEN price_rule <> '' THEN ' rule ' || price_rule ELSE '' END AS item,
                       sum(quantity) AS quantity, sum(amount_nanos) AS amount
                FROM \(schema).rated_usage WHERE \(scope) GROUP BY 1, 2
                """ }
            try collect("""
                SELECT coalesce(l.customer_id, r.customer_id), coalesce(l.item, r.item), l.quantity, r.quantity, l.amount, r.amount
                FROM (\(items(.tally))) l FULL OUTER JOIN (\(items(shadow.schema))) r ON l.customer_id = r.customer_id AND l.item = r.item
                ORDER BY 1, 2
                """, measures: ["quantity", "amount_nanos"])
            let balances = { (schema: SQLIdentifier) in "SELECT customer_id, currency, balance_nanos FROM \(schema).wallets WHERE \(scope)" }
            try collect("""
                SELECT coalesce(l.customer_id, r.customer_id), 'wallet ' || coalesce(l.currency, r.currency), l.balance_nanos, r.balance_nanos
                FROM (\(balances(.tally))) l FULL OUTER JOIN (\(balances(shadow.schema))) r ON l.customer_id = r.customer_id AND l.currency = r.currency
                ORDER BY 1, 2
                """, measures: ["balance_nanos"])
        case .aggregator:
            let windows = { (schema: SQLIdentifier) in """
                SELECT customer_id, model AS item, sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cache_read_input_tokens) AS cr,
                       sum(cache_write_input_tokens) AS cw, sum(reasoning_output_tokens) AS r, sum(event_count) AS n
                FROM (\(AggregatorStore.windowsQuery(schema: schema))) w WHERE \(scope) GROUP BY 1, 2
                """ }
            try collect("""
                SELECT coalesce(l.customer_id, r.customer_id), coalesce(l.item, r.item), l.i, r.i, l.o, r.o, l.cr, r.cr, l.cw, r.cw, l.r, r.r, l.n, r.n
                FROM (\(windows(.tally))) l FULL OUTER JOIN (\(windows(shadow.schema))) r ON l.customer_id = r.customer_id AND l.item = r.item
                ORDER BY 1, 2
                """, measures: ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens",
                                "reasoning_output_tokens", "event_count"])
        }
        return differences
    }
}

public enum PromoteOutcome: Sendable, Equatable {
    /// `pastLogEnd`: partitions where the live consumer stood past the log end (it counted records
    /// this log does not hold); the replay, at the log end, replaced what it had counted.
    case promoted(customers: Int, pastLogEnd: [Int32])
    /// The live consumer moved past the replay on these partitions: replay further, then retry.
    case liveAhead([Int32])
}

extension ShadowSchema {
    /// Replaces the live state of the replayed partitions with the shadow's, in one transaction.
    ///
    /// Handover: the live group's offset rows are locked first, so a live commit waits (its
    /// compare-and-set is the first statement of its transaction). If the live consumer stands
    /// past the replay on any partition, nothing changes (`.liveAhead`). Otherwise the customers
    /// of those partitions get the replayed rows, the live offsets become the replay's and their
    /// `state_version` is bumped: a live consumer behind the replay fails its next compare-and-set
    /// and resumes from the new offset; one level with it continues, and a consumer that caches
    /// state (the rater) sees the new version and reads the promoted state first. Nothing that
    /// arrived during the replay is lost or counted twice: it is in the replayed state exactly
    /// up to the offsets handed over. Price books the replay applied are added to the live catalog.
    ///
    /// A live consumer past the log end is not ahead of a replay that reached that end: the log
    /// lost records it counted (new storage, a recreated topic, acknowledged records lost), and the
    /// handover rebuilds its state from what the log holds, clears the partition's recorded gap
    /// and lowers its credit signing horizon to the handed-over offset (records from there on get
    /// no unsigned allowance). `logEnds` is asked only when the live group stands past the replay,
    /// after its offset rows are locked, so a live commit cannot slip past the ends it reads.
    public func promote(on connection: PostgresConnection, liveGroup: String, replayGroup: String, topic: String,
                        partitions: Set<Int32>?, logEnds: () throws -> [Int32: Int64] = { [:] }) throws -> PromoteOutcome {
        try connection.transaction { connection -> PromoteOutcome in
            // A fold running now would move live window deltas while their customers' rows are
            // replaced: wait for it, and hold off the next until this commits.
            if consumer == .aggregator { try connection.query("SELECT pg_advisory_xact_lock($1)", [AggregatorStore.foldLock]) }
            var replayed: [Int32: Int64] = [:]
            let replay = try connection.query("SELECT partition, next_offset FROM \(schema).consumer_offsets WHERE consumer_group = $1 AND topic = $2",
                                              [replayGroup, topic])
            for row in 0..<replay.rowCount { replayed[Int32(try replay.value(row, 0, as: Int64.self))] = try replay.value(row, 1, as: Int64.self) }
            let chosen = (partitions ?? Set(replayed.keys)).sorted()
            let live = try connection.query("""
                SELECT partition, next_offset FROM tally.consumer_offsets
                WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[]) ORDER BY partition FOR UPDATE
                """, [liveGroup, topic, PostgresArray(chosen)])
            var ahead: [Int32] = []
            var pastLogEnd: [Int32] = []
            var ends: [Int32: Int64]?
            for row in 0..<live.rowCount {
                let partition = Int32(try live.value(row, 0, as: Int64.self))
                let liveOffset = try live.value(row, 1, as: Int64.self), replayOffset = replayed[partition] ?? 0
                guard liveOffset > replayOffset else { continue }
                if ends == nil { ends = try logEnds() }
                if let end = ends?[partition], replayOffset >= end, liveOffset > end { pastLogEnd.append(partition) } else { ahead.append(partition) }
            }
            if !ahead.isEmpty { return .liveAhead(ahead) }

            let scope: [(any PostgresEncodable)?] = [PostgresArray(chosen)]
            try connection.query("""
                CREATE TEMPORARY TABLE promoted_customers ON COMMIT DROP AS
                SELECT customer_id FROM \(schema.qualifying(consumer.keysTable)) WHERE partition = ANY($1::int[])
                UNION SELECT customer_id FROM \(SQLIdentifier.tally.qualifying(consumer.keysTable)) WHERE partition = ANY($1::int[])
                """, scope)
            for table in consumer.tables where table != "consumer_offsets" {
                let columns = try connection.query("""
                    SELECT column_name FROM information_schema.columns WHERE table_schema = 'tally' AND table_name = $1 AND column_name <> 'id'
                    ORDER BY ordinal_position
                    """, [table]).rows.compactMap { $0[0] }
                let list = columns.map { SQLIdentifier($0).description }.joined(separator: ", ")
                if columns.contains("consumer_group") {
                    // Shared tables: this consumer's rows of these partitions, under the live group's name.
                    let selected = columns.map { $0 == "consumer_group" ? "$2::text" : SQLIdentifier($0).description }.joined(separator: ", ")
                    try connection.query("DELETE FROM \(SQLIdentifier.tally.qualifying(table)) WHERE consumer_group = $2 AND partition = ANY($1::int[])", scope + [liveGroup])
                    try connection.query("INSERT INTO \(SQLIdentifier.tally.qualifying(table)) (\(list)) SELECT \(selected) FROM \(schema.qualifying(table)) WHERE partition = ANY($1::int[])",
                                         scope + [liveGroup])
                } else if columns.contains("published_at") || columns.contains("webhook_at"), let id = columns.first.map(SQLIdentifier.init) {
                    // Alerts and top-up requests already published keep their stamp: same id, same crossing.
                    try connection.query("""
                        DELETE FROM \(SQLIdentifier.tally.qualifying(table)) WHERE customer_id IN (SELECT customer_id FROM promoted_customers)
                          AND \(id) NOT IN (SELECT \(id) FROM \(schema.qualifying(table)))
                        """)
                    // Those the replay adds are past crossings re-rated, not news: stamped, so no
                    // webhook tells a payment system to act on them (the topic still gets them).
                    let selected = columns.map { $0 == "webhook_at" ? "now()" : SQLIdentifier($0).description }.joined(separator: ", ")
                    try connection.query("""
                        INSERT INTO \(SQLIdentifier.tally.qualifying(table)) (\(list)) SELECT \(selected) FROM \(schema.qualifying(table))
                        WHERE customer_id IN (SELECT customer_id FROM promoted_customers) ON CONFLICT DO NOTHING
                        """)
                } else {
                    try connection.query("DELETE FROM \(SQLIdentifier.tally.qualifying(table)) WHERE customer_id IN (SELECT customer_id FROM promoted_customers)")
                    try connection.query("INSERT INTO \(SQLIdentifier.tally.qualifying(table)) (\(list)) SELECT \(list) FROM \(schema.qualifying(table)) WHERE customer_id IN (SELECT customer_id FROM promoted_customers)")
                }
            }
            if consumer == .rater, try connection.query("SELECT to_regclass($1)", ["\(schema).price_books"]).scalar != nil {
                try connection.query("INSERT INTO tally.price_books SELECT * FROM \(schema).price_books ON CONFLICT DO NOTHING")
            }
            // The replay's log clocks go with its offsets: the live group goes on deciding the
            // dedup horizon from where the replay stood.
            try connection.query("""
                INSERT INTO tally.consumer_offsets AS o (consumer_group, topic, partition, next_offset, owner_epoch, state_version, log_clock_ms)
                SELECT $1, $2, p, n, 0, 1, (SELECT r.log_clock_ms FROM \(schema).consumer_offsets r
                                            WHERE r.consumer_group = $5 AND r.topic = $2 AND r.partition = x.p)
                FROM unnest($3::int[], $4::bigint[]) AS x(p, n)
                ON CONFLICT (consumer_group, topic, partition)
                DO UPDATE SET next_offset = EXCLUDED.next_offset, state_version = o.state_version + 1, log_clock_ms = EXCLUDED.log_clock_ms
                """, [liveGroup, topic, PostgresArray(chosen), PostgresArray(chosen.map { replayed[$0] ?? 0 }), replayGroup])
            try LogLoss.clearGaps(group: liveGroup, topic: topic, partitions: chosen, on: connection)
            try LogLoss.lowerCreditHorizon(topic: topic, resumeAt: Dictionary(uniqueKeysWithValues: pastLogEnd.map { ($0, replayed[$0] ?? 0) }),
                                           on: connection)
            let customers = try connection.query("SELECT count(*) FROM promoted_customers").int64(0, 0) ?? 0
            return .promoted(customers: Int(customers), pastLogEnd: pastLogEnd)
        }
    }
}
