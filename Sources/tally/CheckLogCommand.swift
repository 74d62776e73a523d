import ArgumentParser
import Foundation
import Logging
import TallyCLI
import TallyKafka
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
        let connection = try connect(database, label: "tally.check-log")
        let topic = kafka.topic
        let rows = try connection.query("""
            SELECT consumer_group, partition, next_offset FROM consumer_offsets
            WHERE topic = $1 AND ($2::text IS NULL OR consumer_group = $2) AND consumer_group NOT LIKE 'tally-replay-%' AND next_offset > 0
            ORDER BY consumer_group, partition
            """, [topic, group])
        var positions: [(group: String, partition: Int32, next: Int64)] = []
        for row in 0..<rows.rowCount {
            positions.append((try rows.value(row, 0, as: String.self), Int32(try rows.value(row, 1, as: Int64.self)), try rows.value(row, 2, as: Int64.self)))
        }
        let ends = try kafka.logEnds(Set(positions.map(\.partition)), logger: logger, confirmedOnly: true)
        let unread = Set(positions.map(\.partition)).subtracting(ends.keys).sorted()
        if !unread.isEmpty {
            print("could not read the log end of partitions \(unread.map(String.init).joined(separator: ",")) of \(topic) (is the broker up?)",
                  to: &standardError)
            throw ExitCode(2)
        }
        let past = positions.filter { $0.next > ends[$0.partition]! }
        guard !past.isEmpty else {
            print("the log of \(topic) holds everything the consumers counted (\(positions.count) stored offsets checked)")
            return
        }
        if keep {
            try connection.transaction { connection in
                for position in past {
                    let end = ends[position.partition]!
                    // state_version: a consumer caching state (the rater) reads it again before going on.
                    try connection.query("""
                        UPDATE consumer_offsets SET next_offset = $4, state_version = state_version + 1
                        WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND next_offset > $4
                        """, [position.group, topic, position.partition, end])
                    // Unsigned credit below the horizon was accepted from the earlier log; this one's records
                    // below its end were never read by the live rater and get no such allowance.
                    try connection.query("""
                        UPDATE unsigned_credit_horizon SET signed_from_offset = least(signed_from_offset, $3)
                        WHERE topic = $1 AND partition = $2
                        """, [topic, position.partition, end])
                }
            }
            for position in past {
                print("group \(position.group), partition \(position.partition): stored offset \(position.next) -> \(ends[position.partition]!) (the log end)")
            }
            print("kept what was counted; the consumers count \(topic) from its log end once restarted")
            return
        }
        print("the log of \(topic) no longer holds everything the consumers counted:")
        for position in past {
            let end = ends[position.partition]!
            print("  group \(position.group), partition \(position.partition): counted up to offset \(position.next), the log ends at \(end)"
                  + " (\(position.next - end) counted records are not in this log)")
        }
        let groups = Set(past.map(\.group)).sorted()
        print("""
            The broker started on new storage, the topic was recreated, or acknowledged records were lost.
            Records appended at those offsets would be taken for counted ones and skipped. Nothing was changed. Either:
              rebuild the derived state from what the log holds (issued invoices stay; a closed period that
              comes out different shows on the next invoice as a credit or debit note):
            \(groups.map { "    tally replay --consumer \(Self.consumer(of: $0)) --live-group \($0) --promote" }.joined(separator: "\n"))
              or keep what was counted and count on from the log end (stop the consumers first, restart them after):
                tally check-log --keep\(group.map { " --group \($0)" } ?? "")
            """)
        throw ExitCode(1)
    }

    /// The consumer a group belongs to, by Tally's naming; `aggregator` when the name says nothing.
    static func consumer(of group: String) -> String { group.contains("rater") ? "rater" : "aggregator" }
}

extension KafkaOptions {
    /// The log end of each partition: the larger of the queried end and the end carried by a
    /// fetch (Tansu answers the query with the last batch's base offset + 1; Apache Kafka answers
    /// it exactly, and a fetch never reports more than the true end).
    /// - Parameter confirmedOnly: leave out partitions no fetch answered within five seconds,
    ///   instead of reporting the queried end for them.
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
                    fetched[partition] = max(queried[partition]!, cached.high)
                }
            }
        }
        return confirmedOnly ? fetched : queried.merging(fetched) { _, fetched in fetched }
    }
}
