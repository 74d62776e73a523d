import TallyCore
import TallyPostgres

/// How a topic's records are placed and judged: the partitioner producers hash keys with, the
/// partition count (`tally.topic_layouts`, migration 0014) and the dedup horizon (migration 0026).
///
/// Recorded by the first Tally process that consumes or produces the topic; every later one
/// refuses to start when its own differs. A changed partitioner (an upgrade from librdkafka's
/// CRC32) or partitions added later would put a customer's new records on another partition than
/// its history, and would make `wrong_partition` decisions depend on when a process started. A
/// consumer deciding with another dedup horizon than the others would count what they refuse.
public struct TopicLayout: Equatable, Sendable, CustomStringConvertible {
    public let partitioner: KeyPartitioner
    public let partitions: Int32
    public let dedupHorizon: DedupHorizon

    public init(partitioner: KeyPartitioner, partitions: Int32, dedupHorizon: DedupHorizon) {
        self.partitioner = partitioner
        self.partitions = partitions
        self.dedupHorizon = dedupHorizon
    }

    public var description: String { "\(partitions) partitions, \(partitioner.rawValue) partitioner, dedup horizon \(dedupHorizon)" }

    /// Records this layout for `topic` unless one is recorded; throws `TopicLayoutMismatch` when
    /// the recorded one differs.
    public func check(topic: String, on connection: PostgresConnection) throws {
        try connection.query("""
            INSERT INTO tally.topic_layouts (topic, partitioner, partitions, dedup_horizon_days) VALUES ($1, $2, $3, $4)
            ON CONFLICT (topic) DO NOTHING
            """, [topic, partitioner.rawValue, partitions, dedupHorizon.days])
        let row = try connection.query("""
            SELECT partitioner, partitions, to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), dedup_horizon_days
            FROM tally.topic_layouts WHERE topic = $1
            """, [topic]).rows[0]
        // The column's CHECK keeps the horizon in DedupHorizon's range.
        let recorded = TopicLayout(partitioner: KeyPartitioner(rawValue: row[0] ?? "") ?? .murmur2, partitions: Int32(row[1] ?? "") ?? 0,
                                   dedupHorizon: DedupHorizon(days: Int(row[3] ?? "") ?? DedupHorizon.defaultDays))
        guard recorded == self else {
            throw TopicLayoutMismatch(topic: topic, recorded: recorded, recordedAt: row[2] ?? "", actual: self)
        }
    }
}

/// A process whose placement of records differs from the topic's recorded one: it must not start.
public struct TopicLayoutMismatch: Error, CustomStringConvertible {
    public let topic: String
    public let recorded: TopicLayout
    public let recordedAt: String
    public let actual: TopicLayout

    public var description: String {
        if recorded.partitioner != actual.partitioner {
            return """
                topic \(topic) was written with the \(recorded.partitioner.rawValue) partitioner (recorded \(recordedAt)), and this \
                process places keys with \(actual.partitioner.rawValue): a customer's records would land on two partitions. Start \
                every Tally executable with --partitioner \(recorded.partitioner.rawValue) (env TALLY_PARTITIONER); see docs/producing.md
                """
        }
        if recorded.dedupHorizon != actual.dedupHorizon {
            return """
                topic \(topic) is deduplicated over a horizon of \(recorded.dedupHorizon) (recorded \(recordedAt)), and this process \
                would decide with \(actual.dedupHorizon): its consumers would count what the others refuse, and a replay would not \
                decide as the live run did. Start every Tally executable with --dedup-horizon-days \(recorded.dedupHorizon.days) \
                (env TALLY_DEDUP_HORIZON_DAYS); see docs/scaling.md
                """
        }
        return """
            topic \(topic) has \(actual.partitions) partitions, but its records were placed for \(recorded.partitions) (recorded \
            \(recordedAt)): partitions added to a keyed topic move customers to other partitions, so Tally does not use it. \
            See docs/producing.md ("The partition count is fixed")
            """
    }
}
