import Foundation
import TallyCore
import TallyKafka
import TallyPipeline

/// A topic held in memory: per partition, its records in offset order. Sources reading it see
/// records appended while they run, as consumers of a Kafka topic do.
public final class InMemoryTopic: @unchecked Sendable {
    public let name: String
    public let partitionCount: Int32
    private let lock = NSLock()
    private var logs: [[ConsumerRecord]]

    public init(name: String = "tally.usage", partitions: Int32 = 4) {
        precondition(partitions > 0)
        self.name = name
        partitionCount = partitions
        logs = Array(repeating: [], count: Int(partitions))
    }

    /// Appends a record keyed by `key`, on the partition Kafka's murmur2 partitioner gives it
    /// unless `partition` says otherwise (a producer that placed it elsewhere); returns its position.
    /// Its timestamp is `timestampMilliseconds`, or by default 2026-11-01T00:00:00Z plus its offset in ms.
    @discardableResult
    public func append(key: String, value: [UInt8], partition: Int32? = nil, headers: [KafkaHeader] = [],
                       timestampMilliseconds: Int64? = nil) -> LogPosition {
        let target = partition ?? KeyPartitioner.murmur2.partition(of: Array(key.utf8), partitions: partitionCount)
        return lock.withLock {
            let offset = Int64(logs[Int(target)].count)
            logs[Int(target)].append(ConsumerRecord(topic: name, partition: target, offset: offset, key: Array(key.utf8), value: value,
                                                    headers: headers, timestampMilliseconds: timestampMilliseconds ?? 1_793_491_200_000 + offset))
            return LogPosition(partition: target, offset: offset)
        }
    }

    /// Appends a usage event keyed by its customer.
    @discardableResult
    public func append(_ event: UsageEvent, timestampMilliseconds: Int64? = nil) -> LogPosition {
        append(key: event.subject, value: EventEncoder.encode(event), timestampMilliseconds: timestampMilliseconds)
    }

    /// The log end of `partition`: the offset the next record gets.
    public func end(_ partition: Int32) -> Int64 { lock.withLock { Int64(logs[Int(partition)].count) } }

    func records(_ partition: Int32, from offset: Int64, limit: Int) -> [ConsumerRecord] {
        lock.withLock {
            let log = logs[Int(partition)]
            let start = Int(max(0, offset))
            guard start < log.count, limit > 0 else { return [] }
            return Array(log[start..<min(log.count, start + limit)])
        }
    }
}

/// A `RecordSource` over an `InMemoryTopic`, with the group's decisions scripted: the first poll
/// assigns `assignment`; `schedule` adds revocations and assignments at chosen polls, delivered
/// through the rebalance handler inside `poll` as librdkafka does. Never waits: an empty poll
/// returns at once.
public final class ScriptedRecordSource: RecordSource, @unchecked Sendable {
    private let topic: InMemoryTopic
    private let assignment: [Int32]
    private let recordsPerPoll: Int
    private var handler: ((RebalanceEvent) -> [TopicPartition: Int64])?
    private var script: [Int: [RebalanceEvent]] = [:]
    /// Fetch position per assigned partition.
    private var positions: [Int32: Int64] = [:]
    private var fetched = Set<Int32>()
    /// How many polls the loop made.
    public private(set) var polls = 0
    /// The positions last published with `commitForMonitoring`.
    public private(set) var monitoredOffsets: [TopicPartition: Int64] = [:]

    /// - Parameters:
    ///   - assignment: the partitions the first poll assigns (default: all).
    ///   - recordsPerPoll: at most this many records per poll, so a log takes several batches.
    public init(topic: InMemoryTopic, assignment: [Int32]? = nil, recordsPerPoll: Int = .max) {
        self.topic = topic
        self.assignment = assignment ?? Array(0..<topic.partitionCount)
        self.recordsPerPoll = recordsPerPoll
    }

    /// Scheduled rebalances not delivered yet (a test checks its script ran).
    public var undeliveredRebalances: Int { script.values.reduce(0) { $0 + $1.count } }

    /// Delivers `event` during poll number `poll` (1-based; the first poll assigns first).
    public func schedule(_ event: RebalanceEvent, atPoll poll: Int) {
        script[poll, default: []].append(event)
    }

    public func subscribe(_ topics: [String], onRebalance: @escaping (RebalanceEvent) -> [TopicPartition: Int64]) throws(KafkaError) {
        precondition(topics == [topic.name], "a scripted source reads its one topic")
        handler = onRebalance
        script[1, default: []].insert(.assigned(assignment.map { TopicPartition(topic.name, $0) }), at: 0)
    }

    public func poll(maxRecords: Int, timeout: Duration) -> [ConsumerRecord] {
        polls += 1
        for event in script.removeValue(forKey: polls) ?? [] { deliver(event) }
        var records: [ConsumerRecord] = []
        let limit = min(maxRecords, recordsPerPoll)
        for partition in positions.keys.sorted() where records.count < limit {
            // Past the log end: the broker answers "offset out of range" and the consumer starts
            // again at the log start, as librdkafka does with auto.offset.reset=earliest.
            if positions[partition]! > topic.end(partition) { positions[partition] = 0 }
            let taken = topic.records(partition, from: positions[partition]!, limit: limit - records.count)
            records += taken
            positions[partition]! += Int64(taken.count)
        }
        // A fetch response carries the high watermark, records or not.
        fetched.formUnion(positions.keys)
        return records
    }

    private func deliver(_ event: RebalanceEvent) {
        let answer = handler?(event) ?? [:]
        switch event {
        case .assigned(let partitions):
            for partition in partitions {
                let start = answer[partition] ?? 0
                positions[partition.partition] = start == KafkaOffset.beginning ? 0 : start
            }
        case .revoked(let partitions, _):
            for partition in partitions {
                positions.removeValue(forKey: partition.partition)
                fetched.remove(partition.partition)
            }
        }
    }

    public func seek(_ offsets: [TopicPartition: Int64], timeout: Duration) throws(KafkaError) {
        for (partition, offset) in offsets where positions[partition.partition] != nil { positions[partition.partition] = offset }
    }

    public func partitionCount(of topic: String, timeout: Duration) throws(KafkaError) -> Int { Int(self.topic.partitionCount) }

    public func cachedWatermarks(_ partition: TopicPartition) -> Watermarks? {
        fetched.contains(partition.partition) ? Watermarks(low: 0, high: topic.end(partition.partition)) : nil
    }

    public func commitForMonitoring(_ offsets: [TopicPartition: Int64]) { monitoredOffsets.merge(offsets) { $1 } }

    public func close() {
        let owned = positions.keys.sorted().map { TopicPartition(topic.name, $0) }
        if !owned.isEmpty { deliver(.revoked(owned, lost: false)) }
    }
}

/// A `DeadLetterSink` that keeps what it is sent.
public final class InMemoryDeadLetterSink: DeadLetterSink, @unchecked Sendable {
    private let lock = NSLock()
    private var sent: [ProducerRecord] = []

    public init() {}

    public var records: [ProducerRecord] { lock.withLock { sent } }

    public func sendAll(_ records: [ProducerRecord], what: String, shouldStop: () -> Bool) -> Bool {
        lock.withLock { sent += records }
        return true
    }
}
