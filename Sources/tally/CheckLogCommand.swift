import ArgumentParser
import Foundation
import Logging
import TallyCLI
import TallyKafka
import TallyPipeline
import TallyPostgres

struct CheckLog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-log",
        abstract: "Does the log still hold what the consumers counted? Per consumer group and partition, the stored offset against the log end.",
        discussion: """
            A stored offset past the log end means the consumers counted records this log does not hold: the broker \
            started on new storage (a memory broker always does), the topic was recreated, or the broker lost records it \
            had acknowledged (Tansu on S3 can lose the batch in flight when killed; Apache Kafka after an unclean leader \
            election). Records appended at those offsets would be taken for counted ones and skipped, so the choices are \
            printed and nothing changes until one is made: rebuild the derived state from what the log holds \
            (`tally replay --promote`), or keep what was counted and count on from the log end (--keep). \
            Exit 0: every stored offset is within the log (or --keep moved them); 1: some are past the log end; \
            2: a log end could not be read.
            """)
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @Option(help: "Only this consumer group. Default: every group but replays.") var group: String?
    @Flag(help: """
        Keep what was counted: move each stored offset past the log end back to the log end, so records appended from \
        now on are counted. Event ids already counted stay known, so an event sent again is still a duplicate. Run it \
        before anything produces to the new log; restart the group's consumers after it.
        """)
    var keep = false

    func run() throws {
        let logger = makeLogger(logging, label: "tally.check-log")
        let topic = kafka.topic
        if let group, group.hasPrefix("tally-replay-") {
            print("\(group) is a replay group: replays read from offset zero into a shadow schema and are not checked", to: &standardError)
            return
        }
        // Whatever stops the check (PostgreSQL or the broker away) is not a finding: exit 2.
        func checking<T>(_ what: String, _ body: () throws -> T) throws -> T {
            do { return try body() } catch {
                print("could not \(what): \(error)", to: &standardError)
                throw ExitCode(2)
            }
        }
        let connection = try checking("connect to PostgreSQL") { try connect(database, label: "tally.check-log") }
        var positions: [Int32: [String: Int64]] = [:]
        var gaps: [Int32: [String: (end: Int64, detectedAt: String)]] = [:]
        try checking("read the stored offsets") {
            let rows = try connection.query("""
                SELECT consumer_group, partition, next_offset FROM consumer_offsets
                WHERE topic = $1 AND ($2::text IS NULL OR consumer_group = $2) AND consumer_group NOT LIKE 'tally-replay-%' AND next_offset > 0
                """, [topic, group])
            for row in 0..<rows.rowCount {
                positions[try rows.value(row, 1, as: Int32.self), default: [:]][try rows.value(row, 0, as: String.self)] = try rows.value(row, 2, as: Int64.self)
            }
            let recorded = try connection.query("""
                SELECT consumer_group, partition, log_end, to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') FROM log_gaps
                WHERE topic = $1 AND ($2::text IS NULL OR consumer_group = $2)
                """, [topic, group])
            for row in 0..<recorded.rowCount {
                gaps[try recorded.value(row, 1, as: Int32.self), default: [:]][try recorded.value(row, 0, as: String.self)] =
                    (try recorded.value(row, 2, as: Int64.self), try recorded.value(row, 3, as: String.self))
            }
        }
        let ends = try checking("read the log ends of \(topic)") {
            try kafka.logEnds(Set(positions.keys), logger: logger, confirmedOnly: true)
        }
        let unread = Set(positions.keys).subtracting(ends.keys).sorted()
        if !unread.isEmpty {
            print("could not read the log end of partitions \(unread.map(String.init).joined(separator: ",")) of \(topic) (is the broker up?)",
                  to: &standardError)
            throw ExitCode(2)
        }
        // Per group and partition: the stored offset, and where counting must go on from: the end
        // first seen by the consumer that found the gap, else the log end now.
        var findings: [(group: String, partition: Int32, stored: Int64, resumeAt: Int64, line: String)] = []
        for (partition, groups) in positions.sorted(by: { $0.key < $1.key }) {
            for (name, stored) in groups.sorted(by: { $0.key < $1.key }) {
                let end = ends[partition]!
                if let gap = gaps[partition]?[name] {
                    findings.append((name, partition, stored, min(gap.end, end),
                                     "group \(name), partition \(partition): counted up to offset \(stored); its consumer found the log ending at \(gap.end) "
                                        + "at \(gap.detectedAt) and stopped reading the partition (the log ends at \(end) now)"))
                } else if stored > end {
                    findings.append((name, partition, stored, end,
                                     "group \(name), partition \(partition): counted up to offset \(stored), the log ends at \(end) "
                                        + "(\(stored - end) counted records are not in this log)"))
                }
            }
        }
        guard !findings.isEmpty else {
            print("the log of \(topic) holds everything the consumers counted (\(positions.values.map(\.count).reduce(0, +)) stored offsets checked)")
            return
        }
        if keep {
            try connection.transaction { connection in
                for finding in findings {
                    // state_version: a consumer caching state (the rater) reads it again before going on.
                    try connection.query("""
                        UPDATE consumer_offsets SET next_offset = $4, state_version = state_version + 1
                        WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND next_offset > $4
                        """, [finding.group, topic, finding.partition, finding.resumeAt])
                    try LogLoss.clearGaps(group: finding.group, topic: topic, partitions: [finding.partition], on: connection)
                    // Groups that had read the lost log to different offsets hold different log
                    // clocks: all resume from the latest, so they judge the new records alike.
                    try connection.query("""
                        UPDATE consumer_offsets SET log_clock_ms = (
                            SELECT max(log_clock_ms) FROM consumer_offsets
                            WHERE topic = $1 AND partition = $2 AND consumer_group NOT LIKE 'tally-replay-%')
                        WHERE topic = $1 AND partition = $2 AND consumer_group NOT LIKE 'tally-replay-%'
                        """, [topic, finding.partition])
                }
                // Where two groups resume differently on a partition, the lower offset: least() keeps it either way.
                try LogLoss.lowerCreditHorizon(topic: topic, resumeAt: findings.reduce(into: [:]) { lowest, finding in
                    lowest[finding.partition] = min(lowest[finding.partition] ?? .max, finding.resumeAt)
                }, on: connection)
            }
            for finding in findings {
                print("group \(finding.group), partition \(finding.partition): stored offset \(finding.stored) -> \(finding.resumeAt)")
            }
            print("kept what was counted; restart the groups' consumers: they count \(topic) from these offsets")
            return
        }
        print("the log of \(topic) no longer holds everything the consumers counted:")
        for finding in findings { print("  " + finding.line) }
        let groups = Set(findings.map(\.group)).sorted()
        print("""
            The broker started on new storage, the topic was recreated, or acknowledged records were lost.
            Records appended at those offsets would be taken for counted ones and skipped. Nothing was changed. Either:
              rebuild the derived state from what the log holds (issued invoices stay; a closed period that
              comes out different shows on the next invoice as a credit or debit note), then restart the consumers:
            \(groups.map { "    tally replay --consumer \(Self.consumer(of: $0)) --live-group \($0) --promote" }.joined(separator: "\n"))
              or keep what was counted and count on from where the log ended (stop the consumers first, restart them after):
                tally check-log --keep\(group.map { " --group \($0)" } ?? "")
            """)
        throw ExitCode(1)
    }

    /// The consumer of Tally's default groups; for another group, the choice is the operator's.
    static func consumer(of group: String) -> String {
        switch group {
        case "tally-aggregator": "aggregator"
        case "tally-rater": "rater"
        default: "aggregator|rater"
        }
    }
}

extension KafkaOptions {
    /// The log end of each partition: the larger of the queried end and the end carried by a
    /// fetch (Tansu answers the query with the last batch's base offset + 1; Apache Kafka answers
    /// it exactly, and a fetch never reports more than the true end).
    /// - Parameter confirmedOnly: only ends a fetch reported (partitions no fetch answered within
    ///   five seconds are left out), never the queried end.
    func logEnds(_ partitions: Set<Int32>, logger: Logger, confirmedOnly: Bool = false) throws -> [Int32: Int64] {
        guard !partitions.isEmpty else { return [:] }
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: try brokers, properties: try extraProperties),
                                         groupID: nil, logger: logger)
        defer { consumer.close() }
        var queried: [Int32: Int64] = [:]
        var starts: [TopicPartition: Int64] = [:]
        for partition in partitions {
            let topicPartition = TopicPartition(topic, partition)
            let marks = try consumer.queryWatermarks(topicPartition)
            queried[partition] = marks.high
            // Fetch the last record the query knows of: the response carries the true end.
            starts[topicPartition] = max(marks.low, marks.high - 1)
        }
        try consumer.assign(starts)
        let deadline = ContinuousClock.now + .seconds(5)
        var fetched: [Int32: Int64] = [:]
        while fetched.count < partitions.count && ContinuousClock.now < deadline {
            _ = consumer.poll(maxRecords: 1000, timeout: .milliseconds(200))
            for partition in partitions {
                if let cached = consumer.cachedWatermarks(TopicPartition(topic, partition)) {
                    // Confirmed: a fetch's end alone (Tansu's queried end can be wrong either way
                    // after a crash); otherwise the larger of the two (the queried end is low on Tansu).
                    fetched[partition] = confirmedOnly ? cached.high : max(queried[partition]!, cached.high)
                }
            }
        }
        return confirmedOnly ? fetched : queried.merging(fetched) { _, fetched in fetched }
    }
}
