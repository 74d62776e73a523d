import Foundation
import Logging
import TallyCore
import TallyKafka
import TallyPostgres

/// A boolean shared between threads: a stop request from a signal handler, readiness for the ops endpoint.
public final class SharedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false

    public init() {}

    public func set(_ newValue: Bool = true) { lock.withLock { value = newValue } }
    public var isSet: Bool { lock.withLock { value } }
}

/// Settings of a consumer loop (the aggregator's and the rater's).
public struct ConsumerSettings: Sendable {
    public var group: String
    /// `tally_aggregator` or `tally_rater`: the prefix of the loop's metric names.
    public var metricsPrefix: String
    public var topic = "tally.usage"
    public var deadLetterTopic = "tally.usage.dlq"
    /// How producers must hash record keys; a record found elsewhere is set aside (`wrong_partition`).
    public var partitioner = KeyPartitioner.murmur2
    /// A batch ends at this many records…
    public var batchSize = 20_000
    /// …or when a poll has waited this long.
    public var batchTimeout = Duration.milliseconds(250)
    public var statsInterval = Duration.seconds(10)
    /// Exit once every assigned partition is consumed to its log end (demo, bench, replay).
    public var exitWhenCaughtUp = false

    /// Checks the signature of credit records (grants, voids) before they are applied; one that
    /// fails is dead-lettered as `unsigned_credit`. Nil applies them unchecked: only for a consumer
    /// that applies no credit (the aggregator).
    public var creditVerifier: CreditVerifier?

    /// How late an event may reach the log and still count (see `DedupHorizon`); part of the
    /// topic's layout, so every consumer of the topic decides alike.
    public var dedupHorizon = DedupHorizon(days: DedupHorizon.defaultDays)
    /// Called once at start with the topic's layout (the partitioner and horizon above, the
    /// broker's partition count); throwing stops the loop before it consumes anything (see `TopicLayout`).
    public var checkLayout: (@Sendable (TopicLayout) throws -> Void)?

    /// Called on the consumer thread after each committed batch (replay shows its progress with it).
    public var onProgress: (@Sendable (ConsumerProgress) -> Void)?

    public init(group: String, metricsPrefix: String) {
        self.group = group
        self.metricsPrefix = metricsPrefix
    }
}

/// Running totals, logged periodically and at exit.
public struct ConsumerStats: Sendable, CustomStringConvertible {
    public var records = 0
    public var accepted = 0
    public var duplicates = 0
    public var conflicts = 0
    public var deadLetters = 0
    public var grants = 0
    public var unpriced = 0
    public var unrateable = 0
    public var batches = 0
    public var fencedBatches = 0
    /// Time spent in PostgreSQL transactions and in preparing batches (decode, dedup input).
    public var commitTime = Duration.zero
    public var prepareTime = Duration.zero
    /// Time the loop spent in `poll` and waiting for the batch in flight to commit, and in the
    /// store's idle upkeep (the aggregator's folds): with the two above, where a run's time went.
    public var pollTime = Duration.zero
    public var waitTime = Duration.zero
    public var upkeepTime = Duration.zero

    public var description: String {
        "records=\(records) accepted=\(accepted) duplicates=\(duplicates) conflicts=\(conflicts) dead_letters=\(deadLetters) grants=\(grants) unpriced=\(unpriced) unrateable=\(unrateable) batches=\(batches) fenced=\(fencedBatches) commit_ms=\(commitTime.totalMilliseconds) prepare_ms=\(prepareTime.totalMilliseconds) "
            + "poll_ms=\(pollTime.totalMilliseconds) wait_ms=\(waitTime.totalMilliseconds) upkeep_ms=\(upkeepTime.totalMilliseconds)"
    }
}

/// Where a consumer stands: per owned partition, its committed position and the log end
/// (from fetch responses; nil until the first fetch), plus its running totals.
public struct ConsumerProgress: Sendable {
    public let positions: [Int32: (next: Int64, end: Int64?)]
    public let stats: ConsumerStats
}

/// The outcome of committing one batch, applied on the consumer thread.
struct BatchOutcome: Sendable {
    /// What became of the batch's partitions, for `PartitionOwnership`.
    var commit = PartitionOwnership.CommitResult()
    var summary = DedupSummary()
    var commitTime = Duration.zero
}

/// A consumer (aggregator or rater): poll a batch, write its effect and its offsets in one
/// PostgreSQL transaction through its `ConsumerStore`, repeat. Runs on the calling thread until `stop` is set.
///
/// Two stages overlap: while one batch commits on the commit queue, the consumer
/// thread polls and decodes the next. At most one batch is in flight; it is
/// finished (committed or abandoned) before the next is handed over and before
/// any rebalance is acted on, so a revoked partition never has work in flight.
public final class ConsumerLoop: @unchecked Sendable {
    private let settings: ConsumerSettings
    private let store: any ConsumerStore
    /// Used on the commit queue only.
    private let deadLetterSink: any DeadLetterSink
    private let logger: Logger
    private let stopFlag: SharedFlag
    private let consumer: any RecordSource
    /// Partitions this instance owns: the epoch claimed, the committed and the read position.
    private var ownership = PartitionOwnership()
    /// The partitions owned, with the epoch claimed and the committed position.
    private var owned: [Int32: PartitionClaim] { ownership.claims }
    private let commitQueue = DispatchQueue(label: "tally.consumer.commit")
    private var inFlight: (batch: PreparedBatch, done: DispatchSemaphore, outcome: OutcomeBox)?
    /// A non-retryable failure seen inside a rebalance callback, rethrown by the loop.
    private var deferredError: Error?
    public private(set) var stats = ConsumerStats()
    private let metrics: ConsumerMetrics
    private let readiness = SharedFlag()
    /// The topic's partition count, read at start: where each customer's records belong.
    private var partitionCount: Int32 = 0
    private var nextUpkeepAttempt = ContinuousClock.now
    /// What a partition's log end below its stored offset means so far (see
    /// `stopReadingPartitionsPastTheLogEnd`): seen, and since when; or a gap (not read), and
    /// whether it is in `tally.log_gaps` yet.
    private enum LogEndFinding {
        case suspected(since: ContinuousClock.Instant, end: Int64)
        case gap(end: Int64, recorded: Bool)
    }
    private var logEndFindings: [Int32: LogEndFinding] = [:]
    /// The partitions not read, with the log end first seen.
    private var gapped: [Int32: Int64] {
        logEndFindings.compactMapValues { if case .gap(let end, _) = $0 { end } else { nil } }
    }

    /// True once partitions were claimed and while commits succeed; false while PostgreSQL is away.
    public var isReady: Bool { readiness.isSet }

    private final class OutcomeBox: @unchecked Sendable {
        var result: Result<BatchOutcome, Error> = .success(BatchOutcome())
    }

    /// A loop over any record source and dead-letter sink (tests pass in-memory twins).
    public init(source: any RecordSource, deadLetters: any DeadLetterSink, store: any ConsumerStore,
                settings: ConsumerSettings, logger: Logger, stop: SharedFlag) {
        self.settings = settings
        self.metrics = ConsumerMetrics(prefix: settings.metricsPrefix)
        self.store = store
        self.logger = logger
        self.stopFlag = stop
        self.consumer = source
        self.deadLetterSink = deadLetters
    }

    /// A loop reading `settings.topic` in consumer group `settings.group` from Kafka, with its
    /// dead letters published to `settings.deadLetterTopic`.
    public convenience init(kafka: KafkaConfiguration, store: any ConsumerStore, settings: ConsumerSettings,
                            logger: Logger, stop: SharedFlag) throws {
        self.init(source: try KafkaConsumer(configuration: kafka, groupID: settings.group, logger: logger),
                  deadLetters: try BlockingProducer(configuration: kafka, logger: logger),
                  store: store, settings: settings, logger: logger, stop: stop)
    }

    private func rebalanced(_ event: RebalanceEvent) -> [TopicPartition: Int64] {
        // Finish the batch in flight first: its partitions may be the ones changing hands.
        do { _ = try awaitInFlight() } catch { deferredError = error }
        switch event {
        case .assigned(let partitions):
            let numbers = partitions.map(\.partition)
            // Claim in PostgreSQL before fetching: the stored offset, not Kafka's, is where we resume.
            while true {
                do {
                    let claims = try store.claim(numbers)
                    // A gap recorded earlier (by this group's instance that owned the partition
                    // before) still holds: the partition stays unread until an operator chooses.
                    let recordedGaps = try store.recordedLogGaps(numbers)
                    readiness.set(true)
                    let action = ownership.claimed(claims)
                    for partition in claims.keys {
                        logEndFindings[partition] = recordedGaps[partition].map { .gap(end: $0, recorded: true) }
                    }
                    if !recordedGaps.isEmpty {
                        logger.error("partitions \(recordedGaps.keys.sorted()) are not read: their log ended below the stored offset (tally.log_gaps); see tally check-log")
                    }
                    logger.info("assigned partitions \(numbers.sorted()) at offsets \(claims.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value.nextOffset)" })")
                    switch action { case .seek(let offsets): return topicPartitions(offsets) }
                } catch let error as any RetryableFailure where error.isRetryable && !stopFlag.isSet {
                    logger.warning("claiming partitions failed, retrying: \(error)")
                    Thread.sleep(forTimeInterval: 0.5)
                } catch {
                    // Without a claim the partitions stay unowned: their records are skipped, never committed.
                    logger.error("claiming partitions \(numbers) failed: \(error)")
                    return [:]
                }
            }
        case .revoked(let partitions, let lost):
            ownership.revoked(partitions.map(\.partition))
            for partition in partitions { logEndFindings.removeValue(forKey: partition.partition) }
            logger.info("\(lost ? "lost" : "revoked") partitions \(partitions.map(\.partition).sorted())")
            return [:]
        }
    }

    /// Consumes until stopped (or caught up, with `exitWhenCaughtUp`), then leaves the group.
    public func run() throws {
        partitionCount = try readPartitionCount()
        try settings.checkLayout?(TopicLayout(partitioner: settings.partitioner, partitions: partitionCount, dedupHorizon: settings.dedupHorizon))
        // The handler runs inside poll on this thread; the source lives no longer than the loop.
        try consumer.subscribe([settings.topic]) { [unowned self] event in rebalanced(event) }
        var lastStats = ContinuousClock.now
        defer {
            // Whatever happens, nothing is left in flight when the group is left.
            _ = try? awaitInFlight()
            consumer.close()
            logger.info("stopped: \(stats)")
        }
        while !stopFlag.isSet {
            let polled = ContinuousClock.now
            let records = consumer.poll(maxRecords: settings.batchSize, timeout: settings.batchTimeout)
            stats.pollTime += ContinuousClock.now - polled
            if let error = deferredError { throw error }
            if try stopReadingPartitionsPastTheLogEnd(records) { return }
            if !records.isEmpty {
                let started = ContinuousClock.now
                var batch = prepare(records)
                stats.prepareTime += ContinuousClock.now - started
                // The previous batch must have committed before this one can go: it moves the
                // offsets this one starts from.
                let previous = try awaitInFlight()
                if previous.commit.abandoned { return }
                batch = batch.removing(previous.commit.fenced.union(previous.commit.resync.keys))
                if !batch.moves.isEmpty { submit(batch) }
            } else if inFlight != nil {
                // Idle poll: finish the batch in flight so progress and caught-up checks are current.
                if try awaitInFlight().commit.abandoned { return }
            } else {
                // Idle with nothing in flight: the store's connection is free for its upkeep.
                runIdleUpkeep()
            }
            if ContinuousClock.now - lastStats >= settings.statsInterval {
                lastStats = ContinuousClock.now
                logger.info("progress: \(stats) lag=\(lag())")
                warnAboutPositionsPastTheLogEnd()
            }
            if settings.exitWhenCaughtUp && records.isEmpty && inFlight == nil && isCaughtUp() {
                runIdleUpkeep()
                // The partitions not read cannot be: the run did not reach the log end, and says why.
                if !gapped.isEmpty {
                    throw LogEndsBelowStoredOffset(topic: settings.topic, ends: gapped, stored: owned.mapValues(\.nextOffset))
                }
                logger.info("caught up with the log end of partitions \(owned.keys.sorted())")
                return
            }
        }
    }

    /// The topic's partition count, waiting while the broker is away or the topic is not made yet.
    /// A count that changes later (partitions added) moves customers between partitions, as for
    /// any keyed Kafka topic: records then land where their customer's history is not, and are set
    /// aside as `wrong_partition` by a consumer started after the change (docs/producing.md).
    private func readPartitionCount() throws -> Int32 {
        while true {
            switch Result(catching: { () throws(KafkaError) -> Int in try consumer.partitionCount(of: settings.topic) }) {
            case .success(let count): return Int32(count)
            case .failure(let error) where error.isRetryable && !stopFlag.isSet:
                logger.warning("reading the partition count of \(settings.topic) failed, retrying: \(error)")
                Thread.sleep(forTimeInterval: 1)
            case .failure(let error): throw error
            }
        }
    }

    /// The store's deferred upkeep (the aggregator folds its window deltas). Its failure loses
    /// nothing and stops nothing: it is tried again at the next idle poll.
    private func runIdleUpkeep() {
        guard ContinuousClock.now >= nextUpkeepAttempt else { return }
        let started = ContinuousClock.now
        defer { stats.upkeepTime += ContinuousClock.now - started }
        do {
            try store.idleUpkeep()
        } catch {
            // Likely PostgreSQL is away: one warning per attempt, not one per idle poll.
            nextUpkeepAttempt = ContinuousClock.now + .seconds(5)
            logger.warning("store upkeep failed, retrying in 5 s: \(error)")
        }
    }

    /// Turns polled records into a batch: only owned partitions, only offsets not yet read.
    private func prepare(_ records: [ConsumerRecord]) -> PreparedBatch {
        var batch = PreparedBatch()
        batch.events.reserveCapacity(records.count)
        let recordsBefore = stats.records
        let classified = Self.classify(records, partitions: partitionCount, partitioner: settings.partitioner)
        // Content hashes and key fingerprints, on both threads as the decoding: this thread's
        // loop below is the consumer's critical path.
        let identities = Self.inHalves(classified.count) { index -> PositionedEvent.Identity? in
            guard case .event(.usage(let event)) = classified[index] else { return nil }
            return PositionedEvent.identity(of: event)
        }
        // By index, reading fields in place: copying each record would retain its arrays.
        for index in records.indices {
            let partition = records[index].partition
            let offset = records[index].offset
            guard let owner = ownership.start(of: partition) else { continue }
            let claim = owner.claim, start = owner.offset
            if case .gap = logEndFindings[partition] { continue }
            let position = batch.moves[partition]?.next ?? start
            guard offset >= position else { continue }
            if position == 0 && offset > 0 && batch.moves[partition] == nil {
                // Reading from offset zero, but the log starts later (retention): say so plainly.
                logger.warning("partition \(partition) starts at offset \(offset): records 0..<\(offset) are no longer retained, so they are not counted")
            }
            stats.records += 1
            let logPosition = LogPosition(partition: partition, offset: offset)
            if let time = records[index].timestampMilliseconds {
                batch.recordTimes = (min(batch.recordTimes?.oldest ?? time, time), max(batch.recordTimes?.newest ?? time, time))
            }
            // The partition's log clock up to and including this record, and whether a usage event
            // came too late (see `DedupHorizon`).
            let usageTime: EventTime? = if case .event(.usage(let event)) = classified[index] { event.time } else { nil }
            let judged = settings.dedupHorizon.judge(offset: offset, fromOffset: claim.horizonFromOffset,
                                                     clock: batch.logClocks[partition] ?? owner.logClock,
                                                     recordMilliseconds: records[index].timestampMilliseconds, eventTime: usageTime)
            if let clock = judged.clock { batch.logClocks[partition] = clock }
            switch classified[index] {
            case .event(.usage(let event)):
                // A copy sent by `tally pricing rate-unpriced` is judged by its first copy, counted already.
                if let refusal = judged.refusal, records[index].header(rateUnpricedHeader) == nil {
                    batch.deadLetters.append(DeadLetter(position: logPosition, reason: refusal, key: records[index].key, value: records[index].value))
                    break
                }
                batch.events.append(PositionedEvent(event: event, position: logPosition, identity: identities[index]!))
                if !records[index].headers.isEmpty, records[index].header(rateUnpricedHeader) != nil { batch.rateUnpricedAt.insert(logPosition) }
            case .event(.grant(let grant)):
                if let refusal = creditRefusal(records[index]) {
                    batch.deadLetters.append(DeadLetter(position: logPosition, reason: refusal, key: records[index].key, value: records[index].value))
                } else {
                    batch.grants.append(PositionedGrant(grant: grant, position: logPosition))
                }
            case .event(.grantVoid(let void)):
                if let refusal = creditRefusal(records[index]) {
                    batch.deadLetters.append(DeadLetter(position: logPosition, reason: refusal, key: records[index].key, value: records[index].value))
                } else {
                    batch.voids.append(PositionedGrantVoid(void: void, position: logPosition))
                }
            case .event(.budget(let budget)):
                // Signed like credit: a budget decides what a customer may spend.
                if let refusal = creditRefusal(records[index]) {
                    batch.deadLetters.append(DeadLetter(position: logPosition, reason: refusal, key: records[index].key, value: records[index].value))
                } else {
                    batch.budgets.append(PositionedBudget(budget: budget, position: logPosition))
                }
            case .poison(let reason):
                batch.deadLetters.append(DeadLetter(position: logPosition, reason: reason, key: records[index].key, value: records[index].value))
            }
            batch.moves[partition] = (expected: start, next: offset + 1, epoch: claim.epoch)
        }
        metrics.records.increment(by: stats.records - recordsBefore)
        ownership.prepared(batch.moves, logClocks: batch.logClocks)
        return batch
    }

    /// Why a credit record may not be applied (see `ConsumerSettings.creditVerifier`), or nil.
    private func creditRefusal(_ record: ConsumerRecord) -> PoisonReason? {
        guard let verifier = settings.creditVerifier else { return nil }
        return verifier.refusal(topic: record.topic, partition: record.partition, offset: record.offset,
                                signature: record.header(CreditKeyring.headerName),
                                key: record.key, value: record.value, binaryMode: record.isBinaryModeCloudEvent)
    }

    /// Decoding is most of what this thread does per record: the second half of a large poll is
    /// decoded on another thread while this one decodes the first. Results keep the records' order.
    public static func classify(_ records: [ConsumerRecord], partitions: Int32, partitioner: KeyPartitioner) -> [ClassifiedRecord] {
        inHalves(records.count) { records[$0].classified(partitions: partitions, partitioner: partitioner) }
    }

    /// `(0..<count).map(body)`, the second half on another thread once there are 1,000 or more.
    static func inHalves<Element>(_ count: Int, _ body: @escaping (Int) -> Element) -> [Element] {
        guard count >= 1_000 else { return (0..<count).map(body) }
        let middle = count / 2
        // Both halves are written straight into one array, each thread into its own range:
        // joining two arrays afterwards would copy (and retain) every element again.
        return [Element](unsafeUninitializedCapacity: count) { buffer, initialized in
            nonisolated(unsafe) let start = buffer.baseAddress!
            nonisolated(unsafe) let body = body
            let secondHalf = BackgroundJob {
                for index in middle..<count { (start + index).initialize(to: body(index)) }
            }
            for index in 0..<middle { (start + index).initialize(to: body(index)) }
            if case .failure = secondHalf.wait() { fatalError("the work of a half cannot throw") }
            initialized = count
        }
    }

    /// One log line per committed dead letter and conflict, so an operator can find the record
    /// by partition and offset; capped per batch so 10k poison records do not flood the log.
    private func logRecordsSetAside(_ deadLetters: [DeadLetter], conflicts: [EventConflict]) {
        let cap = 50
        for letter in deadLetters.prefix(cap) {
            logger.warning("dead-lettered a record", metadata: [
                "partition": "\(letter.position.partition)", "offset": "\(letter.position.offset)",
                "reason": "\(letter.reason.code)", "detail": "\(letter.reason.detail)",
            ])
        }
        for conflict in conflicts.prefix(cap) {
            logger.warning("event id seen before with another payload; the first counts", metadata: [
                "partition": "\(conflict.position.partition)", "offset": "\(conflict.position.offset)",
                "customer_id": "\(conflict.key.customerID)", "event_id": "\(conflict.key.eventID)",
            ])
        }
        let omitted = max(0, deadLetters.count - cap) + max(0, conflicts.count - cap)
        if omitted > 0 {
            logger.warning("\(omitted) more dead letters or conflicts in this batch; see tally.dead_letters and tally.event_conflicts")
        }
    }

    /// Hands a batch to the commit queue.
    private func submit(_ batch: PreparedBatch) {
        let box = OutcomeBox()
        let done = DispatchSemaphore(value: 0)
        commitQueue.async { [self] in
            box.result = Result { try write(batch) }
            done.signal()
        }
        inFlight = (batch, done, box)
    }

    /// Waits for the batch in flight and applies its outcome on the consumer thread.
    private func awaitInFlight() throws -> BatchOutcome {
        guard let flight = inFlight else { return BatchOutcome() }
        inFlight = nil
        let waited = ContinuousClock.now
        flight.done.wait()
        stats.waitTime += ContinuousClock.now - waited
        let outcome = try flight.outcome.result.get()
        stats.commitTime += outcome.commitTime
        // Not written (abandoned): these partitions are read again from their committed offsets.
        let action = ownership.applied(outcome.commit, partitions: flight.batch.moves.keys)
        if outcome.commit.abandoned { return outcome }
        if !outcome.commit.committed.isEmpty {
            stats.batches += 1
            stats.accepted += outcome.summary.accepted
            stats.duplicates += outcome.summary.duplicates
            stats.conflicts += outcome.summary.conflicts.count
            stats.deadLetters += outcome.summary.deadLetters
            stats.grants += outcome.summary.grants
            stats.unpriced += outcome.summary.unpriced
            stats.unrateable += outcome.summary.unrateable.count
            metrics.accepted.increment(by: outcome.summary.accepted)
            metrics.duplicates.increment(by: outcome.summary.duplicates)
            metrics.conflicts.increment(by: outcome.summary.conflicts.count)
            let setAside = flight.batch.deadLetters.filter { outcome.commit.committed[$0.position.partition] != nil }
            logRecordsSetAside(setAside, conflicts: outcome.summary.conflicts)
            for letter in setAside { metrics.deadLetters(reason: letter.reason.code).increment() }
            metrics.grants.increment(by: outcome.summary.grants)
            metrics.unpriced.increment(by: outcome.summary.unpriced)
            metrics.unrateable.increment(by: outcome.summary.unrateable.count)
            for line in outcome.summary.unrateable { logger.error("record kept aside in tally.unrateable_records: \(line)") }
            metrics.batchRecords.record(flight.batch.events.count + flight.batch.grants.count + flight.batch.voids.count + flight.batch.budgets.count + flight.batch.deadLetters.count)
            metrics.transactionSeconds.recordNanoseconds(outcome.commitTime.totalNanoseconds)
            for (partition, next) in outcome.commit.committed {
                if let high = consumer.cachedWatermarks(TopicPartition(settings.topic, partition))?.high {
                    metrics.lag(partition: partition).record(max(0, high - next))
                }
            }
            // For lag monitoring only; we never resume from Kafka's offsets.
            consumer.commitForMonitoring(topicPartitions(outcome.commit.committed))
            if let onProgress = settings.onProgress {
                onProgress(ConsumerProgress(positions: Dictionary(uniqueKeysWithValues: owned.map { partition, claim in
                    (partition, (claim.nextOffset, consumer.cachedWatermarks(TopicPartition(settings.topic, partition))?.high))
                }), stats: stats))
            }
        }
        if !outcome.commit.fenced.isEmpty {
            stats.fencedBatches += 1
            metrics.fencedBatches.increment()
            logger.warning("fenced on partitions \(outcome.commit.fenced.sorted()): another instance owns them now; dropping their records")
        }
        if case .seek(let offsets)? = action {
            logger.warning("stored offsets moved under our own epoch (an earlier commit landed); resuming from \(offsets)")
            try? consumer.seek(topicPartitions(offsets))
        }
        return outcome
    }

    /// Runs on the commit queue: dead letters to their topic, then the transaction,
    /// retried through database outages until it lands or the loop stops.
    private func write(_ batch: PreparedBatch) throws -> BatchOutcome {
        var outcome = BatchOutcome()
        guard publishDeadLetters(batch.deadLetters) else {
            outcome.commit.abandoned = true
            return outcome
        }
        let started = ContinuousClock.now
        var pending = batch
        while !pending.moves.isEmpty {
            do {
                switch try store.commit(pending) {
                case .committed(let summary):
                    readiness.set(true)
                    for (partition, move) in pending.moves {
                        outcome.commit.committed[partition] = move.next
                        if let clock = pending.logClocks[partition] { outcome.commit.committedClocks[partition] = clock }
                    }
                    outcome.summary = summary
                    outcome.commitTime = ContinuousClock.now - started
                    return outcome
                case .fenced(let partitions):
                    outcome.commit.fenced.formUnion(partitions)
                    pending = pending.removing(partitions)
                case .resync(let offsets):
                    outcome.commit.resync.merge(offsets) { $1 }
                    pending = pending.removing(Set(offsets.keys))
                }
            } catch let error as any RetryableFailure where error.isRetryable {
                if stopFlag.isSet {
                    outcome.commit.abandoned = true
                    outcome.commitTime = ContinuousClock.now - started
                    return outcome
                }
                readiness.set(false)
                logger.warning("commit failed, retrying the batch: \(error)")
                Thread.sleep(forTimeInterval: 0.5)
            }
        }
        outcome.commitTime = ContinuousClock.now - started
        return outcome
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
        return deadLetterSink.sendAll(records, what: "dead-letter publish", shouldStop: { stopFlag.isSet })
    }

    private func isCaughtUp() -> Bool {
        guard !owned.isEmpty else { return false }
        for (partition, claim) in owned {
            if case .gap = logEndFindings[partition] { continue }
            guard let marks = consumer.cachedWatermarks(TopicPartition(settings.topic, partition)),
                  claim.nextOffset >= marks.high else { return false }
        }
        return true
    }

    /// A partition whose log ends below the offset this group stored lost records the group
    /// counted (new broker storage, a recreated topic, acknowledged records lost). Records appended
    /// below that offset would be taken for counted ones and skipped, even once the log grows past
    /// it again, so the partition is not read any more: the gap is recorded in `tally.log_gaps`
    /// with the end first seen, where `tally check-log` finds it and offers the choices; the
    /// other partitions go on. Checked after every poll, before its records are prepared.
    ///
    /// Evidence: records below the read position (Apache Kafka answered "offset out of range" and
    /// the consumer went back to the log start: a fetch never returns records below where it
    /// asked otherwise), or a high watermark below the stored offset for 30 seconds (Tansu answers
    /// a fetch past its log end with nothing, so only the watermark tells). A new Kafka partition
    /// leader may report a watermark behind the old one's until its followers catch up, which is
    /// why the watermark alone must last. The window is a trade-off: records appended past the
    /// stored offset within it on such a broker are read, and the ones below it are then missed.
    /// The end recorded is the first watermark seen below the stored offset, else the lowest
    /// record below it.
    /// - Returns: true when the batch in flight was abandoned (the loop is stopping).
    private func stopReadingPartitionsPastTheLogEnd(_ records: [ConsumerRecord]) throws -> Bool {
        // One pass over the poll (it is on the hot path): per partition, the lowest record below its read position.
        var below: [Int32: Int64] = [:]
        for index in records.indices {
            let partition = records[index].partition, offset = records[index].offset
            if let position = ownership.readPositions[partition], offset < position, offset < below[partition] ?? .max { below[partition] = offset }
        }
        for (partition, claim) in owned {
            if case .gap = logEndFindings[partition] { continue }
            let lowestBelow = below[partition]
            let high = consumer.cachedWatermarks(TopicPartition(settings.topic, partition))?.high
            if let high, high < claim.nextOffset, logEndFindings[partition] == nil {
                logEndFindings[partition] = .suspected(since: ContinuousClock.now, end: high)
            }
            var suspicion: (since: ContinuousClock.Instant, end: Int64)?
            if case .suspected(let since, let end) = logEndFindings[partition] { suspicion = (since, end) }
            guard lowestBelow != nil || (suspicion.map { ContinuousClock.now - $0.since >= .seconds(30) } ?? false) else {
                if let high, high >= claim.nextOffset { logEndFindings.removeValue(forKey: partition) }
                continue
            }
            let end = suspicion?.end ?? lowestBelow!
            logEndFindings[partition] = .gap(end: end, recorded: false)
            logger.error("partition \(partition) ends at offset \(end), below the stored offset \(claim.nextOffset): the log lost records this group counted; the partition is not read until an operator chooses (tally check-log)")
        }
        let unrecorded = logEndFindings.compactMap { partition, finding -> (partition: Int32, end: Int64)? in
            if case .gap(let end, recorded: false) = finding { (partition, end) } else { nil }
        }.sorted { $0.partition < $1.partition }
        guard !unrecorded.isEmpty else { return false }
        // The store's connection is free only with nothing in flight.
        if try awaitInFlight().commit.abandoned { return true }
        for (partition, end) in unrecorded {
            guard let claim = owned[partition] else { continue }
            do {
                try store.recordLogGap(partition: partition, storedOffset: claim.nextOffset, logEnd: end)
                logEndFindings[partition] = .gap(end: end, recorded: true)
            } catch let error as any RetryableFailure where error.isRetryable {
                logger.warning("recording the log gap of partition \(partition) failed, retrying: \(error)")
                return false
            }
        }
        return false
    }

    /// Said again every stats interval while a partition is not read.
    private func warnAboutPositionsPastTheLogEnd() {
        for (partition, end) in gapped.sorted(by: { $0.key < $1.key }) {
            logger.error("partition \(partition) is not read: its log ended at \(end), below the stored offset \(owned[partition]?.nextOffset ?? -1); see tally check-log")
        }
    }

    private func topicPartitions(_ offsets: [Int32: Int64]) -> [TopicPartition: Int64] {
        Dictionary(uniqueKeysWithValues: offsets.map { (TopicPartition(settings.topic, $0.key), $0.value) })
    }

    private func lag() -> String {
        owned.sorted { $0.key < $1.key }.map { partition, claim -> String in
            let high = consumer.cachedWatermarks(TopicPartition(settings.topic, partition))?.high
            return "\(partition):\(high.map { String(max(0, $0 - claim.nextOffset)) } ?? "?")"
        }.joined(separator: ",")
    }
}

/// A run that must reach the log end (`exitWhenCaughtUp`) found partitions whose log ends below
/// the stored offset: it cannot, and says which.
public struct LogEndsBelowStoredOffset: Error, CustomStringConvertible {
    public let topic: String
    public let ends: [Int32: Int64]
    public let stored: [Int32: Int64]

    public var description: String {
        "the log of \(topic) ends below the stored offsets on partitions "
            + ends.keys.sorted().map { "\($0) (log end \(ends[$0]!), stored \(stored[$0] ?? -1))" }.joined(separator: ", ")
            + ": it lost records that were counted; see tally check-log"
    }
}
