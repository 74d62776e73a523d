import Foundation
import Logging
import TallyCore
import TallyKafka
import TallyPostgres

/// A flag set from a signal handler and read by the consumer thread.
public final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false

    public init() {}

    public func stop() { lock.withLock { stopped = true } }
    public var isStopped: Bool { lock.withLock { stopped } }
}

/// Settings of the aggregator's consumer loop.
public struct AggregatorSettings: Sendable {
    public var group = "tally-aggregator"
    public var topic = "tally.usage"
    public var deadLetterTopic = "tally.usage.dlq"
    /// A batch ends at this many records…
    public var batchSize = 20_000
    /// …or when a poll has waited this long.
    public var batchTimeout = Duration.milliseconds(250)
    public var statsInterval = Duration.seconds(10)
    /// Exit once every assigned partition is consumed to its log end (demo, bench, replay).
    public var exitWhenCaughtUp = false
    /// Fault injection for tests: a pause between preparing a batch and committing it,
    /// so a SIGSTOP lands while a batch is in flight (env TALLY_FAULT_COMMIT_DELAY_MS).
    public var faultCommitDelay: Duration?

    public init() {}
}

/// Running totals, logged periodically and at exit.
public struct AggregatorStats: Sendable, CustomStringConvertible {
    public var records = 0
    public var accepted = 0
    public var duplicates = 0
    public var conflicts = 0
    public var deadLetters = 0
    public var batches = 0
    public var fencedBatches = 0
    /// Time spent in PostgreSQL transactions and in preparing batches (decode, dedup input).
    public var commitTime = Duration.zero
    public var prepareTime = Duration.zero

    public var description: String {
        "records=\(records) accepted=\(accepted) duplicates=\(duplicates) conflicts=\(conflicts) dead_letters=\(deadLetters) batches=\(batches) fenced=\(fencedBatches) commit_ms=\(commitTime.components.seconds * 1000 + commitTime.components.attoseconds / 1_000_000_000_000_000) prepare_ms=\(prepareTime.components.seconds * 1000 + prepareTime.components.attoseconds / 1_000_000_000_000_000)"
    }
}

/// The dedup/aggregation consumer: poll a batch, write its effect and its offsets in one
/// PostgreSQL transaction, repeat. Runs on the calling thread until `stop` is set.
public final class AggregatorLoop: @unchecked Sendable {
    private let settings: AggregatorSettings
    private let store: AggregatorStore
    private let deadLetterProducer: KafkaProducer
    private let logger: Logger
    private let stopFlag: StopFlag
    private var consumer: KafkaConsumer!
    /// Partitions this instance owns, with the epoch it claimed and its committed position.
    private var owned: [Int32: PartitionClaim] = [:]
    public private(set) var stats = AggregatorStats()

    public init(kafka: KafkaConfiguration, store: AggregatorStore, settings: AggregatorSettings,
                logger: Logger, stop: StopFlag) throws {
        self.settings = settings
        self.store = store
        self.logger = logger
        self.stopFlag = stop
        deadLetterProducer = try KafkaProducer(configuration: kafka, logger: logger)
        // The handler runs inside poll on this loop's thread; `self` outlives the consumer.
        let handler = RebalanceHandler()
        consumer = try KafkaConsumer(configuration: kafka, groupID: settings.group, logger: logger) { handler.loop?.rebalanced($0) ?? [:] }
        handler.loop = self
    }

    private final class RebalanceHandler: @unchecked Sendable {
        weak var loop: AggregatorLoop?
    }

    private func rebalanced(_ event: RebalanceEvent) -> [TopicPartition: Int64] {
        switch event {
        case .assigned(let partitions):
            let numbers = partitions.map(\.partition)
            // Claim in PostgreSQL before fetching: the stored offset, not Kafka's, is where we resume.
            while true {
                do {
                    let claims = try store.claim(numbers)
                    for (partition, claim) in claims { owned[partition] = claim }
                    logger.info("assigned partitions \(numbers.sorted()) at offsets \(claims.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value.nextOffset)" })")
                    return Dictionary(uniqueKeysWithValues: claims.map { (TopicPartition(settings.topic, $0.key), $0.value.nextOffset) })
                } catch let error as PostgresError where error.isRetryable && !stopFlag.isStopped {
                    logger.warning("claiming partitions failed, retrying: \(error)")
                    Thread.sleep(forTimeInterval: 0.5)
                } catch {
                    // Without a claim the partitions stay unowned: their records are skipped, never committed.
                    logger.error("claiming partitions \(numbers) failed: \(error)")
                    return [:]
                }
            }
        case .revoked(let partitions, let lost):
            for partition in partitions { owned.removeValue(forKey: partition.partition) }
            logger.info("\(lost ? "lost" : "revoked") partitions \(partitions.map(\.partition).sorted())")
            return [:]
        }
    }

    /// Consumes until stopped (or caught up, with `exitWhenCaughtUp`), then leaves the group.
    public func run() throws {
        try consumer.subscribe([settings.topic])
        var lastStats = ContinuousClock.now
        defer {
            consumer.close()
            logger.info("stopped: \(stats)")
        }
        while !stopFlag.isStopped {
            let records = consumer.poll(maxRecords: settings.batchSize, timeout: settings.batchTimeout)
            if !records.isEmpty {
                let started = ContinuousClock.now
                let batch = prepare(records)
                stats.prepareTime += ContinuousClock.now - started
                if !batch.moves.isEmpty {
                    if let delay = settings.faultCommitDelay { Thread.sleep(forTimeInterval: Double(delay.components.seconds) + Double(delay.components.attoseconds) / 1e18) }
                    guard publishDeadLetters(batch.deadLetters) else { return }
                    let committing = ContinuousClock.now
                    defer { stats.commitTime += ContinuousClock.now - committing }
                    guard try commit(batch) else { return }
                }
            }
            if ContinuousClock.now - lastStats >= settings.statsInterval {
                lastStats = ContinuousClock.now
                logger.info("progress: \(stats) lag=\(lag())")
                warnAboutPositionsPastTheLogEnd()
            }
            if settings.exitWhenCaughtUp && records.isEmpty && isCaughtUp() {
                logger.info("caught up with the log end of partitions \(owned.keys.sorted())")
                return
            }
        }
    }

    /// Turns polled records into a batch: only owned partitions, only offsets not yet committed.
    private func prepare(_ records: [ConsumerRecord]) -> PreparedBatch {
        var batch = PreparedBatch()
        for record in records {
            guard let claim = owned[record.partition] else { continue }
            let position = batch.moves[record.partition]?.next ?? claim.nextOffset
            guard record.offset >= position else { continue }
            stats.records += 1
            let logPosition = LogPosition(partition: record.partition, offset: record.offset)
            switch ClassifiedRecord.classify(record.value) {
            case .event(.usage(let event)):
                batch.events.append(PositionedEvent(event: event, position: logPosition))
            case .poison(let reason):
                batch.deadLetters.append(DeadLetter(position: logPosition, reason: reason, key: record.key, value: record.value))
            }
            batch.moves[record.partition] = (expected: claim.nextOffset, next: record.offset + 1, epoch: claim.epoch)
        }
        return batch
    }

    /// Publishes poison records to the dead-letter topic before their offsets move.
    ///
    /// A crash between this and the PostgreSQL commit re-publishes them on restart
    /// (the topic is at-least-once); `dead_letters` rows are exactly once.
    /// Returns false when stopped before the broker acknowledged.
    private func publishDeadLetters(_ letters: [DeadLetter]) -> Bool {
        guard !letters.isEmpty else { return true }
        let records = letters.map { letter in
            ProducerRecord(topic: settings.deadLetterTopic, key: letter.key, value: letter.value ?? [], headers: [
                KafkaHeader("tally.reason", string: letter.reason.code),
                KafkaHeader("tally.detail", string: String(letter.reason.detail.prefix(1000))),
                KafkaHeader("tally.source.topic", string: settings.topic),
                KafkaHeader("tally.source.partition", string: String(letter.position.partition)),
                KafkaHeader("tally.source.offset", string: String(letter.position.offset)),
                KafkaHeader("tally.consumer.group", string: settings.group),
            ])
        }
        while true {
            let failures = blockingSend(records).compactMap { result -> KafkaError? in
                if case .failure(let error) = result { return error } else { return nil }
            }
            if failures.isEmpty { return true }
            logger.warning("dead-letter publish failed (\(failures.count) records), retrying: \(failures[0])")
            if stopFlag.isStopped { return false }
            Thread.sleep(forTimeInterval: 0.5)
        }
    }

    private func blockingSend(_ records: [ProducerRecord]) -> [Result<DeliveryReport, KafkaError>] {
        final class Box: @unchecked Sendable { var results: [Result<DeliveryReport, KafkaError>] = [] }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        let producer = deadLetterProducer
        Task {
            box.results = await producer.send(records)
            done.signal()
        }
        done.wait()
        return box.results
    }

    /// Commits a batch, retrying through database outages; returns false when stopped first.
    private func commit(_ batch: PreparedBatch) throws -> Bool {
        var pending = batch
        while !pending.moves.isEmpty {
            do {
                switch try store.commit(pending) {
                case .committed(let summary):
                    var positions: [TopicPartition: Int64] = [:]
                    for (partition, move) in pending.moves {
                        owned[partition]?.nextOffset = move.next
                        positions[TopicPartition(settings.topic, partition)] = move.next
                    }
                    stats.batches += 1
                    stats.accepted += summary.accepted
                    stats.duplicates += summary.duplicates
                    stats.conflicts += summary.conflicts
                    stats.deadLetters += summary.deadLetters
                    // For lag monitoring only; we never resume from Kafka's offsets.
                    consumer.commitForMonitoring(positions)
                    return true
                case .fenced(let partitions):
                    stats.fencedBatches += 1
                    logger.warning("fenced on partitions \(partitions.sorted()): another instance owns them now; dropping their records")
                    for partition in partitions { owned.removeValue(forKey: partition) }
                    pending = pending.removing(partitions)
                case .resync(let offsets):
                    logger.warning("stored offsets moved under our own epoch (an earlier commit landed); resuming from \(offsets)")
                    for (partition, offset) in offsets { owned[partition]?.nextOffset = offset }
                    try consumer.seek(Dictionary(uniqueKeysWithValues: offsets.map { (TopicPartition(settings.topic, $0.key), $0.value) }))
                    pending = pending.removing(Set(offsets.keys))
                }
            } catch let error as PostgresError where error.isRetryable {
                if stopFlag.isStopped { return false }
                logger.warning("commit failed, retrying the batch: \(error)")
                Thread.sleep(forTimeInterval: 0.5)
            }
        }
        return true
    }

    private func isCaughtUp() -> Bool {
        guard !owned.isEmpty else { return false }
        for (partition, claim) in owned {
            guard let marks = consumer.cachedWatermarks(TopicPartition(settings.topic, partition)),
                  claim.nextOffset >= marks.high else { return false }
        }
        return true
    }

    /// A stored position past the log end means the topic was recreated or truncated under
    /// us; records below it would be skipped, so say so loudly instead of idling silently.
    private func warnAboutPositionsPastTheLogEnd() {
        for (partition, claim) in owned {
            if let high = consumer.cachedWatermarks(TopicPartition(settings.topic, partition))?.high, claim.nextOffset > high {
                logger.error("stored offset \(claim.nextOffset) of partition \(partition) is past the log end \(high): was the topic recreated? Replay or reset this group's offsets.")
            }
        }
    }

    private func lag() -> String {
        owned.keys.sorted().map { partition -> String in
            let high = consumer.cachedWatermarks(TopicPartition(settings.topic, partition))?.high
            return "\(partition):\(high.map { String(max(0, $0 - owned[partition]!.nextOffset)) } ?? "?")"
        }.joined(separator: ",")
    }
}
