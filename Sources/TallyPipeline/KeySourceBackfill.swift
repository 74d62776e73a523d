import Logging
import TallyCore
import TallyKafka
import TallyPostgres

/// Fills in the sources of dedup keys stored before event identities included them (migration
/// 0014 marked them `DedupKey.anySource`), by reading each key's record from the log at the
/// partition and offset the key keeps. Grant keys get their fingerprint recomputed, which no
/// longer covers time and source. After it, the live tables decide as a replay from offset zero
/// does, and the consumers stop looking keys up on every batch.
///
/// Safe while the consumers run: a key only narrows from "this id from any source" to the
/// source its record has. Keys whose record the log no longer holds keep `anySource`.
public struct KeySourceBackfill {
    public let connection: PostgresConnection
    public let kafka: KafkaConfiguration
    public let topic: String
    public let logger: Logger

    public init(connection: PostgresConnection, kafka: KafkaConfiguration, topic: String, logger: Logger) {
        self.connection = connection
        self.kafka = kafka
        self.topic = topic
        self.logger = logger
    }

    public struct Outcome: Sendable, Equatable {
        /// Keys (and kept-aside unpriced rows) given their record's source, per table.
        public var filled: [String: Int] = [:]
        /// Positions whose record the log no longer holds, or that is no event.
        public var unreadable = 0
    }

    private static let tables = ["usage_event_keys", "rater_event_keys", "unpriced_usage"]

    public func run() throws -> Outcome {
        // Every position to read: keys without a source, and grant keys (their fingerprint changed).
        var wanted: [Int32: Set<Int64>] = [:]
        for table in Self.tables {
            let grants = table == "rater_event_keys" ? " OR event_source = ''" : ""
            let rows = try connection.query("SELECT partition, record_offset FROM \(SQLIdentifier.tally.qualifying(table)) WHERE event_source = $1\(grants)",
                                            [DedupKey.anySource])
            for row in 0..<rows.rowCount { wanted[Int32(try rows.value(row, 0, as: Int64.self)), default: []].insert(try rows.value(row, 1, as: Int64.self)) }
        }
        var outcome = Outcome()
        guard !wanted.isEmpty else { return outcome }
        // What each record says: its customer and id (a key is filled only from its own record), source, grant fingerprint.
        var sources: [LogPosition: (customer: String, id: String, source: String, grantHash: UInt64?)] = [:]
        let consumer = try KafkaConsumer(configuration: kafka, groupID: nil, logger: logger)
        defer { consumer.close() }
        try consumer.assign(Dictionary(uniqueKeysWithValues: wanted.map { (TopicPartition(topic, $0.key), $0.value.min()!) }))
        var last: [Int32: Int64] = [:]
        var idlePolls = 0
        while wanted.contains(where: { (last[$0.key] ?? -1) < $0.value.max()! }) && idlePolls < 20 {
            let records = consumer.poll(maxRecords: 10_000, timeout: .milliseconds(500))
            idlePolls = records.isEmpty ? idlePolls + 1 : 0
            for record in records {
                last[record.partition] = max(last[record.partition] ?? -1, record.offset)
                guard wanted[record.partition]?.contains(record.offset) == true else { continue }
                switch record.classified(partitions: nil, partitioner: .murmur2) {
                case .event(.usage(let event)):
                    sources[LogPosition(partition: record.partition, offset: record.offset)] = (event.subject, event.id, event.source, nil)
                case .event(.grant(let grant)):
                    sources[LogPosition(partition: record.partition, offset: record.offset)] =
                        (grant.subject, grant.id, DedupKey.grantSource, ContentHash.of(grant))
                case .event(.grantVoid), .event(.budget), .poison: break
                }
            }
        }
        outcome.unreadable = wanted.values.reduce(0) { $0 + $1.count } - sources.count
        let positions = sources.keys.sorted()
        let parameters: [(any PostgresEncodable)?] = [
            PostgresArray(positions.map(\.partition)), PostgresArray(positions.map(\.offset)),
            PostgresArray(positions.map { sources[$0]!.source }),
            PostgresArray(positions.map { sources[$0]!.grantHash.map { String(ContentHash.signed($0)) } }),
            DedupKey.anySource, PostgresArray(positions.map { sources[$0]!.customer }), PostgresArray(positions.map { sources[$0]!.id }),
        ]
        try connection.transaction { connection in
            for table in Self.tables {
                let hash = table == "unpriced_usage" ? "" : ", content_hash = coalesce(u.h::bigint, k.content_hash)"
                let grants = table == "rater_event_keys" ? " OR k.event_source = ''" : ""
                outcome.filled[table] = try connection.query("""
                    UPDATE \(SQLIdentifier.tally.qualifying(table)) k SET event_source = u.s\(hash)
                    FROM unnest($1::int[], $2::bigint[], $3::text[], $4::text[], $6::text[], $7::text[]) AS u(p, o, s, h, c, e)
                    WHERE k.partition = u.p AND k.record_offset = u.o AND k.customer_id = u.c AND k.event_id = u.e
                      AND (k.event_source = $5\(grants))
                    """, parameters).affectedRows
            }
        }
        return outcome
    }
}
