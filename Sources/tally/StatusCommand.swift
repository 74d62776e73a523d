import ArgumentParser
import Foundation
import Logging
import TallyCLI
import TallyCore
import TallyKafka
import TallyPostgres

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per consumer group and partition: stored offset, log end, lag, last commit and owning instance.",
        discussion: "Positions are the ones stored in PostgreSQL (where consumers resume from). Exit 1 when a lag exceeds --max-lag.")
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @Option(help: "Only this consumer group.") var group: String?
    @Option(help: "Exit 1 when any partition lags by more records than this.") var maxLag: Int64?
    @Flag(help: "Also list replay groups (tally-replay-*).") var includeReplays = false
    @Option(help: "table, json or csv.") var format = "table"

    func run() throws {
        let logger = makeLogger(logging, label: "tally.status")
        let connection = try connect(database, label: "tally.status")
        let rows = try connection.query("""
            SELECT consumer_group, partition, next_offset,
                   coalesce(to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), ''), coalesce(owner_instance, ''),
                   coalesce(to_char(to_timestamp(log_clock_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '')
            FROM consumer_offsets WHERE topic = $1 AND ($2::text IS NULL OR consumer_group = $2)
              AND ($3 OR consumer_group NOT LIKE 'tally-replay-%')
            ORDER BY consumer_group, partition
            """, [kafka.topic, group, includeReplays])
        var positions: [(group: String, partition: Int32, next: Int64, committed: String, owner: String, logTime: String)] = []
        for row in 0..<rows.rowCount {
            positions.append((try rows.value(row, 0, as: String.self), Int32(try rows.value(row, 1, as: Int64.self)), try rows.value(row, 2, as: Int64.self),
                              try rows.value(row, 3, as: String.self), try rows.value(row, 4, as: String.self), try rows.value(row, 5, as: String.self)))
        }
        let ends = try kafka.logEnds(Set(positions.map(\.partition)), logger: logger)
        var worst: Int64 = 0
        let table = positions.map { position -> [String] in
            let end = ends[position.partition]
            let lag = end.map { max(0, $0 - position.next) }
            worst = max(worst, lag ?? 0)
            return [position.group, String(position.partition), String(position.next), end.map(String.init) ?? "?", lag.map(String.init) ?? "?",
                    position.committed, position.owner, position.logTime]
        }
        // log_time: the partition's log clock, which the dedup horizon is measured on (docs/scaling.md).
        print(TableRenderer.render(header: ["group", "partition", "stored_offset", "log_end", "lag", "last_commit", "owner", "log_time"], rows: table,
                                   format: format, numericFrom: 1), terminator: "")
        try printKeptAside(connection)
        if let maxLag, worst > maxLag {
            print("lag \(worst) exceeds --max-lag \(maxLag)", to: &standardError)
            throw ExitCode(1)
        }
    }

    /// Usage the rater could not bill, per model or reason: never billed at zero, never silent.
    /// Beside the table for people; on standard error for json and csv, which stay one document.
    func printKeptAside(_ connection: PostgresConnection) throws {
        let unpriced = try connection.query("""
            SELECT model, count(*)::text, min(event_time)::text, max(event_time)::text FROM unpriced_usage GROUP BY model ORDER BY count(*) DESC, model
            """)
        let unrateable = try connection.query("SELECT count(*)::text, coalesce(max(reason), '') FROM unrateable_records").rows[0]
        // One line per consumer group and reason; a customer split over partitions shows here as wrong_partition.
        let setAside = try connection.query("""
            SELECT consumer_group, reason_code, count(*)::text, min(reason) FROM dead_letters WHERE topic = $1
            GROUP BY 1, 2 ORDER BY 1, 2
            """, [kafka.topic])
        let gaps = try connection.query("""
            SELECT consumer_group, partition::text, stored_offset::text, log_end::text FROM log_gaps
            WHERE topic = $1 AND consumer_group NOT LIKE 'tally-replay-%' ORDER BY 1, 2::int
            """, [kafka.topic])
        let undeclared = try connection.query("""
            SELECT meter, count(*)::text, min(event_time)::text, max(event_time)::text FROM meter_undeclared_readings
            GROUP BY meter ORDER BY count(*) DESC, meter
            """)
        var text = ""
        if gaps.rowCount > 0 {
            text += "\npartitions not read: their log ended below the stored offset (in tally.log_gaps; the choices: tally check-log):\n"
            text += TableRenderer.render(header: ["group", "partition", "stored_offset", "log_end_seen"], rows: gaps.rows.map { $0.map { $0 ?? "" } },
                                         format: "table", numericFrom: 1)
        }
        if setAside.rowCount > 0 {
            text += "\nrecords set aside (in tally.dead_letters and the .dlq topic; nothing of them was counted):\n"
            text += TableRenderer.render(header: ["group", "reason", "records", "e.g."], rows: setAside.rows.map { row in
                row.enumerated().map { $0.offset == 3 ? String(($0.element ?? "").prefix(160)) : $0.element ?? "" }
            }, format: "table", numericFrom: 2)
            if setAside.rows.contains(where: { $0[1] == DedupHorizon.reasonCode }) {
                let days = try connection.query("SELECT dedup_horizon_days::text FROM topic_layouts WHERE topic = $1", [kafka.topic]).scalar ?? "?"
                text += "past_dedup_horizon: events whose time lay more than the topic's dedup horizon (\(days) days) before their partition's log time; produce them sooner (docs/scaling.md)\n"
            }
        }
        if unpriced.rowCount > 0 {
            text += "\nunpriced usage (no price book prices the model at the event time; in tally.unpriced_usage):\n"
            text += TableRenderer.render(header: ["model", "events", "first", "last"], rows: unpriced.rows.map { $0.map { $0 ?? "" } },
                                         format: "table", numericFrom: 1)
        }
        if undeclared.rowCount > 0 {
            text += "\nreadings of undeclared meters (kept in tally.meter_undeclared_readings; tally meters apply folds them into windows):\n"
            text += TableRenderer.render(header: ["meter", "readings", "first", "last"], rows: undeclared.rows.map { $0.map { $0 ?? "" } },
                                         format: "table", numericFrom: 1)
        }
        if unrateable[0] != "0" {
            text += "\nunrateable records (rating them would pass the amounts Tally stores; in tally.unrateable_records): \(unrateable[0] ?? "0")\n"
            text += "  e.g. \(unrateable[1] ?? "")\n"
        }
        guard !text.isEmpty else { return }
        if format == "table" { print(text, terminator: "") } else { print(text, terminator: "", to: &standardError) }
    }
}
