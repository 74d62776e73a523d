import Logging
import TallyCore
import TallyPostgres

/// The aggregator's state in PostgreSQL: offsets, dedup keys, windows, conflicts, dead letters.
public final class AggregatorStore: ConsumerStore, @unchecked Sendable {
    public let tables: ConsumerTables
    private var connection: PostgresConnection { tables.connection }

    public init(connection: PostgresConnection, group: String, topic: String, instanceID: String) {
        tables = ConsumerTables(connection: connection, group: group, topic: topic, instanceID: instanceID)
    }

    public func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] { try tables.claim(partitions) }

    /// Applies a batch in one transaction; steps 1 and 6 are in `ConsumerTables.commit`.
    public func commit(_ batch: PreparedBatch) throws -> CommitOutcome {
        // Stateless between batches: a promoted state (replay) needs nothing here.
        try tables.commit(batch) { _, _ in
            // 2. Dedup against stored keys, then decide (pure) which events count.
            let stored = try tables.storedHashes(of: batch.events, table: "usage_event_keys")
            let decision = Deduplicator.decide(batch.events, stored: stored)
            // 3. Store the keys of the events that count while (4.) their hourly window deltas
            //    are summed and encoded (daily and monthly are views over them); then write them.
            let hourly = try tables.storeKeys(decision.accepted, table: "usage_event_keys") {
                var deltas = WindowDeltas(granularities: [.hour])
                // A batch of many customers' events has a window for every second event or so.
                deltas.reserveCapacity(decision.accepted.count / 2)
                for positioned in decision.accepted { deltas.add(positioned.event) }
                return Self.upsertParameters(deltas.rows(.hour))
            }
            if let hourly { try upsertHourly(hourly) }
            // 5. Conflicts and dead letters, idempotent by position.
            try tables.insertConflicts(decision.conflicts)
            try tables.insertDeadLetters(batch.deadLetters)
            // Operational, not state: how long records took from ingest to their windows.
            if let times = batch.recordTimes {
                try connection.query("""
                    INSERT INTO ingest_latency (consumer_group, records, oldest_record_at, newest_record_at)
                    VALUES ($1, $2, to_timestamp($3::bigint / 1000.0), to_timestamp($4::bigint / 1000.0))
                    """, [tables.group, batch.events.count + batch.grants.count + batch.deadLetters.count, times.oldest, times.newest])
            }
            return DedupSummary(accepted: decision.accepted.count, duplicates: decision.duplicates,
                                conflicts: decision.conflicts, deadLetters: batch.deadLetters.count)
        }
    }

    private func upsertHourly(_ parameters: [String]) throws {
        try connection.query("""
            INSERT INTO usage_windows_hourly AS w (customer_id, window_start, model, feature, provider, environment, input_tokens, output_tokens,
                cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count)
            SELECT c, to_timestamp(w), m, f, p, e, i, o, cr, cw, r, t, n
            FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[],
                $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[]) AS x(c, w, m, f, p, e, i, o, cr, cw, r, t, n)
            ON CONFLICT (customer_id, window_start, model, feature, provider, environment) DO UPDATE SET
                input_tokens = w.input_tokens + EXCLUDED.input_tokens,
                output_tokens = w.output_tokens + EXCLUDED.output_tokens,
                cache_read_input_tokens = w.cache_read_input_tokens + EXCLUDED.cache_read_input_tokens,
                cache_write_input_tokens = w.cache_write_input_tokens + EXCLUDED.cache_write_input_tokens,
                reasoning_output_tokens = w.reasoning_output_tokens + EXCLUDED.reasoning_output_tokens,
                total_tokens = w.total_tokens + EXCLUDED.total_tokens,
                event_count = w.event_count + EXCLUDED.event_count
            """, parameters)
    }

    /// The upsert's arrays as text, so they can be built while the keys are being copied.
    private static func upsertParameters(_ rows: [(key: WindowKey, measures: UsageMeasures)]) -> [String]? {
        guard !rows.isEmpty else { return nil }
        return [
                PostgresArray(rows.map(\.key.dimensions.customerID)),
                // Window starts are whole hours: seconds since the epoch convert exactly.
                PostgresArray(rows.map { $0.key.start / 1_000_000 }),
                PostgresArray(rows.map(\.key.dimensions.model)),
                PostgresArray(rows.map(\.key.dimensions.feature)),
                PostgresArray(rows.map(\.key.dimensions.provider)),
                PostgresArray(rows.map(\.key.dimensions.environment)),
                PostgresArray(rows.map(\.measures.inputTokens)),
                PostgresArray(rows.map(\.measures.outputTokens)),
                PostgresArray(rows.map(\.measures.cacheReadInputTokens)),
                PostgresArray(rows.map(\.measures.cacheWriteInputTokens)),
                PostgresArray(rows.map(\.measures.reasoningOutputTokens)),
                PostgresArray(rows.map(\.measures.totalTokens)),
                PostgresArray(rows.map(\.measures.eventCount)),
            ].map(\.postgresText)
    }
}
