import Foundation
import Logging
import TallyCore
import TallyPostgres

/// The aggregator's state in PostgreSQL: offsets, dedup keys, windows, conflicts, dead letters.
///
/// A batch appends its hourly window deltas to `usage_window_deltas`; they are folded into
/// `usage_windows_hourly` in bulk (migration 0012 says why). The view `usage_windows` sums both.
public final class AggregatorStore: ConsumerStore, @unchecked Sendable {
    public let tables: ConsumerTables
    private var connection: PostgresConnection { tables.connection }
    /// Fold once this many delta rows were appended since the last fold (and whenever idle).
    public let foldThreshold: Int
    /// Delta rows this store appended since its last fold between batches.
    private var rowsSinceFold = 0
    /// Deltas may be waiting: set by every append and at start (an earlier instance may have
    /// left some), cleared by a fold when idle.
    private var mayHaveDeltas = true
    /// Runs the folds the threshold asks for, beside the next batches.
    private let folder: WindowFolder
    /// Meter windows, written in the batch's transaction.
    private let meterWriter: MeterWindowWriter

    public init(connection: PostgresConnection, group: String, topic: String, instanceID: String, folder: WindowFolder,
                foldThreshold: Int = 200_000) {
        tables = ConsumerTables(connection: connection, group: group, topic: topic, instanceID: instanceID)
        self.foldThreshold = foldThreshold
        self.folder = folder
        meterWriter = MeterWindowWriter(connection: connection)
    }

    public func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] {
        meterWriter.forgetStoredValues()
        return try tables.claim(partitions)
    }

    public func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        try tables.recordLogGap(partition: partition, storedOffset: storedOffset, logEnd: logEnd)
    }

    public func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] { try tables.recordedLogGaps(partitions) }

    /// Applies a batch in one transaction; steps 1 and 6 are in `ConsumerTables.commit`.
    public func commit(_ batch: PreparedBatch) throws -> CommitOutcome {
        // Stateless between batches but for the meter writer's stored unique values, which any
        // outcome but a commit forgets (a promoted state, a reset).
        var appendedRows = 0
        let outcome: CommitOutcome
        do {
            outcome = try commitOnce(batch, appendedRows: &appendedRows)
        } catch {
            meterWriter.forgetStoredValues()
            throw error
        }
        if case .committed = outcome {
            meterWriter.batchCommitted()
            rowsSinceFold += appendedRows
            mayHaveDeltas = true
        } else {
            meterWriter.forgetStoredValues()
        }
        if rowsSinceFold >= foldThreshold {
            // The batch has committed: a failed fold leaves the deltas to the next one.
            rowsSinceFold = 0
            folder.start()
        }
        return outcome
    }

    private func commitOnce(_ batch: PreparedBatch, appendedRows: inout Int) throws -> CommitOutcome {
        try tables.commit(batch) { _, versions in
            // A replay promoted a state under us: what the meter writer knows stored may not be.
            meterWriter.stateVersions(versions)
            // 2. Dedup against stored keys, then decide (pure) which events count.
            let stored = try tables.storedHashes(of: batch.events, table: "usage_event_keys")
            let decision = Deduplicator.decide(batch.events, stored: stored)
            let hasMeters = try meterWriter.loadCatalog(for: decision.accepted)
            // 3. Store the keys of the events that count while (4.) their hourly token and meter
            //    window deltas are summed (daily and monthly are views over them); then append them.
            let (hourly, meters) = try tables.storeKeys(decision.accepted, table: "usage_event_keys") {
                var deltas = WindowDeltas(granularities: [.hour])
                // A batch of many customers' events has a window for every second event or so.
                deltas.reserveCapacity(decision.accepted.count / 2)
                for positioned in decision.accepted { deltas.add(positioned.event) }
                return (deltas.windows[.hour] ?? [:], hasMeters ? meterWriter.fold(decision.accepted) : nil)
            }
            try appendDeltas(hourly)
            appendedRows = hourly.count
            if let meters { appendedRows += try meterWriter.append(meters) }
            // 5. Conflicts and dead letters, idempotent by position.
            try tables.insertConflicts(decision.conflicts)
            try tables.insertDeadLetters(batch.deadLetters)
            // Operational, not state: how long records took from ingest to their windows.
            if let times = batch.recordTimes {
                try connection.query("""
                    INSERT INTO ingest_latency (consumer_group, records, oldest_record_at, newest_record_at)
                    VALUES ($1, $2, to_timestamp($3::bigint / 1000.0), to_timestamp($4::bigint / 1000.0))
                    """, [tables.group, batch.events.count + batch.grants.count + batch.voids.count + batch.budgets.count + batch.deadLetters.count, times.oldest, times.newest])
            }
            return DedupSummary(accepted: decision.accepted.count, duplicates: decision.duplicates,
                                conflicts: decision.conflicts, deadLetters: batch.deadLetters.count)
        }
    }

    /// Folds whatever deltas are waiting: the loop calls this when a poll found nothing.
    public func idleUpkeep() throws {
        guard mayHaveDeltas else { return }
        // Waits for a fold still running (which would hold the lock, so this one would move
        // nothing), then folds meters on the folder's connection beside the tokens on this one.
        if try folder.fold(beside: connection) { mayHaveDeltas = false }
    }

    /// Moves every committed delta row into `usage_windows_hourly` and the meter windows, summed
    /// per window. Returns false, moving nothing, while another fold (any instance's) or a
    /// promotion holds the lock. Tokens and meters are tables apart, each folded whole in a
    /// transaction of its own, so readers of either see the same sums before and after; given
    /// `meterConnection`, the server folds the two side by side.
    static func fold(on connection: PostgresConnection, metersOn meterConnection: PostgresConnection? = nil) throws -> Bool {
        // Taken before the transactions' snapshots, so a fold always sees the previous one's work.
        guard try connection.query("SELECT pg_try_advisory_lock($1)", [Self.foldLock]).scalar == "t" else { return false }
        defer { _ = try? connection.query("SELECT pg_advisory_unlock($1)", [Self.foldLock]) }
        if let meterConnection {
            let meters = BackgroundJob { try inSnapshot(meterConnection, MeterWindowWriter.foldDeltas) }
            let tokens = Result { try inSnapshot(connection, foldTokenDeltas) }
            try meters.wait().get()
            try tokens.get()
        } else {
            try inSnapshot(connection, foldTokenDeltas)
            try inSnapshot(connection, MeterWindowWriter.foldDeltas)
        }
        return true
    }

    /// Runs a fold's statements in one REPEATABLE READ transaction: its DELETEs remove exactly
    /// the rows its INSERTs summed, and rows appended meanwhile wait for the next fold. Should
    /// two folds ever overlap (the lock lost with a dropped connection), the second fails to
    /// serialize rather than moving rows twice.
    private static func inSnapshot(_ connection: PostgresConnection, _ fold: (PostgresConnection) throws -> Void) throws {
        try connection.transaction { connection in
            try connection.query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            // Room to group a few hundred thousand rows in memory; the default 4 MB sorts them on disk.
            try connection.query("SET LOCAL work_mem = '256MB'")
            try fold(connection)
        }
    }

    private static func foldTokenDeltas(on connection: PostgresConnection) throws {
        try connection.query("""
            INSERT INTO usage_windows_hourly AS w (\(keyColumns), input_tokens,
                output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count)
            SELECT \(keyColumns), sum(input_tokens), sum(output_tokens),
                   sum(cache_read_input_tokens), sum(cache_write_input_tokens), sum(reasoning_output_tokens), sum(total_tokens), sum(event_count)
            FROM usage_window_deltas GROUP BY \(keyColumns)
            ON CONFLICT (\(keyColumns)) DO UPDATE SET
                input_tokens = w.input_tokens + EXCLUDED.input_tokens,
                output_tokens = w.output_tokens + EXCLUDED.output_tokens,
                cache_read_input_tokens = w.cache_read_input_tokens + EXCLUDED.cache_read_input_tokens,
                cache_write_input_tokens = w.cache_write_input_tokens + EXCLUDED.cache_write_input_tokens,
                reasoning_output_tokens = w.reasoning_output_tokens + EXCLUDED.reasoning_output_tokens,
                total_tokens = w.total_tokens + EXCLUDED.total_tokens,
                event_count = w.event_count + EXCLUDED.event_count
            """)
        try connection.query("DELETE FROM usage_window_deltas")
    }

    /// Every hourly window in `schema`, folded or not, as the view `tally.usage_windows` has
    /// them; for schemas that have no such view (a replay's), and for comparisons that must not
    /// depend on when folds ran.
    public static func windowsQuery(schema: SQLIdentifier) -> String {
        let columns = keyColumns + ", " + measureColumns.joined(separator: ", ")
        return """
            SELECT \(keyColumns), \(measureColumns.map { "sum(\($0)) AS \($0)" }.joined(separator: ", "))
            FROM (SELECT \(columns) FROM \(schema).usage_windows_hourly UNION ALL SELECT \(columns) FROM \(schema).usage_window_deltas) w
            GROUP BY \(keyColumns)
            """
    }

    /// A window row's key: its customer, hour and `UsageDimensions`.
    private static let keyColumns = "customer_id, window_start, model, feature, provider, environment, status"

    private static let measureColumns = ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens",
                                         "reasoning_output_tokens", "total_tokens", "event_count"]

    /// One fold at a time; a replay's promotion waits for a running one and holds off the next.
    public static let foldLock: Int64 = 0x7461_6c6c_7966_6f6c  // "tallyfol"

    private func appendDeltas(_ rows: [WindowKey: UsageMeasures]) throws {
        guard !rows.isEmpty else { return }
        let sql = """
            COPY usage_window_deltas (\(Self.keyColumns), input_tokens, output_tokens,
                cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count) FROM STDIN WITH (FORMAT binary)
            """
        func key(_ key: WindowKey, _ fields: inout CopyFields) {
            let dimensions = key.dimensions
            fields.add(dimensions.customerID)
            fields.add(timestampMicroseconds: key.start)
            fields.add(dimensions.model)
            fields.add(dimensions.feature)
            fields.add(dimensions.provider)
            fields.add(dimensions.environment)
            fields.add(dimensions.status)
        }
        // Delta rows are bigint: a window whose batch sum exceeds Int64 (a thousand events of the
        // largest valid counts) goes in as several rows that add up to it; folds sum them as numeric.
        if rows.values.allSatisfy(\.fitsOneRow) {
            try connection.copyIn(sql, format: .binary, rows: rows) { row, fields in
                key(row.key, &fields)
                let measures = row.value
                fields.add(Int64(measures.inputTokens))
                fields.add(Int64(measures.outputTokens))
                fields.add(Int64(measures.cacheReadInputTokens))
                fields.add(Int64(measures.cacheWriteInputTokens))
                fields.add(Int64(measures.reasoningOutputTokens))
                fields.add(Int64(measures.totalTokens))
                fields.add(Int64(measures.eventCount))
            }
        } else {
            let split = rows.flatMap { row in row.value.storedRows.map { (row.key, $0) } }
            try connection.copyIn(sql, format: .binary, rows: split) { row, fields in
                key(row.0, &fields)
                for value in row.1 { fields.add(value) }
            }
        }
    }
}

/// Folds window deltas on a connection and thread of its own, so the batches after the one that
/// asked for a fold commit while it runs: in line, each fold (0.7 s for 400,000 rows) held up
/// the next batch. One fold at a time; a request while one runs is dropped, and the rows it
/// would have moved wait for the next fold. A fold cut short by the process exiting is rolled
/// back by the server and moves nothing.
public final class WindowFolder: @unchecked Sendable {
    private let connection: PostgresConnection
    private let queue = DispatchQueue(label: "tally.window-folder")
    private let lock = NSLock()
    private var running = false
    private let logger = Logger(label: "tally.window-folder")

    public init(connection: PostgresConnection) {
        self.connection = connection
    }

    /// Starts a fold unless one is running.
    func start() {
        let idle = lock.withLock { () -> Bool in
            if running { return false }
            running = true
            return true
        }
        guard idle else { return }
        queue.async {
            do { _ = try AggregatorStore.fold(on: self.connection) } catch {
                self.logger.warning("folding window deltas failed; the next fold retries: \(error)")
            }
            self.lock.withLock { self.running = false }
        }
    }

    /// Once no fold runs, folds on `connection` with the meters on this folder's connection,
    /// which nothing else uses meanwhile: see `AggregatorStore.fold`.
    func fold(beside connection: PostgresConnection) throws -> Bool {
        try queue.sync { try AggregatorStore.fold(on: connection, metersOn: self.connection) }
    }
}
