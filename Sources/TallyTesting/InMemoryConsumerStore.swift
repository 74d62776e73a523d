import Foundation
import TallyCore
import TallyPipeline

/// What PostgreSQL holds for one consumer group of the aggregator, in memory: stored offsets with
/// their owner epochs, dedup keys, usage windows, dead letters and conflicts. The stores of
/// several instances share one, as they share a database, so fencing between them is real.
public final class InMemoryDatabase: @unchecked Sendable {
    public struct StoredOffset: Equatable, Sendable {
        public var next: Int64
        public var epoch: Int64
        public var logClock: Int64?
    }

    /// Everything a replay must rebuild identically (`==` compares them all).
    public struct Snapshot: Equatable, Sendable {
        public var offsets: [Int32: Int64]
        /// Each partition's log clock (`DedupHorizon`), where it has one.
        public var logClocks: [Int32: Int64]
        public var keys: [DedupKey: UInt64]
        public var windows: WindowDeltas
        public var deadLetters: [LogPosition: String]
        public var conflicts: [LogPosition: DedupKey]
    }

    private let lock = NSLock()
    private var offsets: [Int32: StoredOffset] = [:]
    private var keys: [DedupKey: UInt64] = [:]
    private var windows = WindowDeltas()
    private var deadLetters: [LogPosition: String] = [:]
    private var conflicts: [LogPosition: DedupKey] = [:]
    private var transactions = 0
    private var gaps: [Int32: Int64] = [:]

    public init() {}

    public var snapshot: Snapshot {
        lock.withLock {
            Snapshot(offsets: offsets.mapValues(\.next), logClocks: offsets.compactMapValues(\.logClock), keys: keys, windows: windows, deadLetters: deadLetters, conflicts: conflicts)
        }
    }

    /// Per partition, the log end the first consumer to find the log shorter than its stored offset saw.
    public var logGaps: [Int32: Int64] { lock.withLock { gaps } }

    func recordLogGap(partition: Int32, logEnd: Int64) {
        lock.withLock { if gaps[partition] == nil { gaps[partition] = logEnd } }
    }

    /// Sets a partition's stored offset, as a database that outlived its log holds it.
    public func setStoredOffset(partition: Int32, to next: Int64) {
        lock.withLock { offsets[partition, default: StoredOffset(next: 0, epoch: 0)].next = next }
    }

    /// Committed batch transactions.
    public var committedTransactions: Int { lock.withLock { transactions } }

    /// Per customer, the monthly sums (input, output, cache read, cache write, reasoning, total, events).
    public var monthlyTotals: [String: [Int128]] {
        lock.withLock {
            var totals: [String: [Int128]] = [:]
            for (key, measures) in windows.windows[.month] ?? [:] {
                let row = totals[key.dimensions.customerID] ?? Array(repeating: 0, count: 7)
                totals[key.dimensions.customerID] = zip(row, measures.values).map { $0 + $1 }
            }
            return totals
        }
    }

    func claim(_ partitions: [Int32]) -> [Int32: PartitionClaim] {
        lock.withLock {
            var claims: [Int32: PartitionClaim] = [:]
            for partition in partitions {
                var stored = offsets[partition] ?? StoredOffset(next: 0, epoch: 0)
                stored.epoch += 1
                offsets[partition] = stored
                claims[partition] = PartitionClaim(epoch: stored.epoch, nextOffset: stored.next, logClock: stored.logClock)
            }
            return claims
        }
    }

    /// The PostgreSQL store's transaction, in the same order: the compare-and-set on (offset,
    /// epoch) first; a partition another instance claimed since is fenced, one whose offset moved
    /// under our own epoch resyncs; only then dedup, windows, dead letters and the offsets.
    func commit(_ batch: PreparedBatch) -> CommitOutcome {
        lock.withLock {
            var fenced = Set<Int32>()
            var resync: [Int32: PartitionClaim] = [:]
            for (partition, move) in batch.moves {
                let stored = offsets[partition] ?? StoredOffset(next: 0, epoch: 0)
                if stored.epoch != move.epoch {
                    fenced.insert(partition)
                } else if stored.next != move.expected {
                    resync[partition] = PartitionClaim(epoch: stored.epoch, nextOffset: stored.next, logClock: stored.logClock)
                }
            }
            if !fenced.isEmpty { return .fenced(fenced) }
            if !resync.isEmpty { return .resync(resync) }
            let decision = Deduplicator.decide(batch.events, stored: keys.filter { key, _ in batch.events.contains { $0.key == key } })
            var summary = DedupSummary()
            for accepted in decision.accepted {
                keys[accepted.key] = accepted.contentHash
                windows.add(accepted.event)
            }
            summary.accepted = decision.accepted.count
            summary.duplicates = decision.duplicates
            summary.conflicts = decision.conflicts
            for conflict in decision.conflicts { conflicts[conflict.position] = conflict.key }
            for letter in batch.deadLetters { deadLetters[letter.position] = letter.reason.code }
            summary.deadLetters = batch.deadLetters.count
            for (partition, move) in batch.moves {
                offsets[partition]!.next = move.next
                // As PostgreSQL's GREATEST, which ignores NULL.
                if let clock = batch.logClocks[partition] { offsets[partition]!.logClock = max(offsets[partition]!.logClock ?? clock, clock) }
            }
            transactions += 1
            return .committed(summary)
        }
    }
}

/// The aggregator's `ConsumerStore` over an `InMemoryDatabase`, for in-process tests of the loop.
public final class InMemoryConsumerStore: ConsumerStore, @unchecked Sendable {
    public let database: InMemoryDatabase

    public init(database: InMemoryDatabase) {
        self.database = database
    }

    public func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] { database.claim(partitions) }

    public func commit(_ batch: PreparedBatch) throws -> CommitOutcome { database.commit(batch) }

    public func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        database.recordLogGap(partition: partition, logEnd: logEnd)
    }

    public func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] { database.logGaps.filter { partitions.contains($0.key) } }
}

/// A store failure the loop retries, as it retries a lost PostgreSQL connection.
public struct TransientStoreFailure: RetryableFailure, CustomStringConvertible {
    public let description: String
    public var isRetryable: Bool { true }

    public init(_ description: String) { self.description = description }
}

/// Wraps a store with scheduled faults, so tests reach the loop's fault paths in-process. Faults
/// live here, in the test support target, never in the production stores.
public final class FaultyStore: ConsumerStore, @unchecked Sendable {
    public enum Fault: Sendable {
        /// The commit fails before anything is written (the connection dropped).
        case failBeforeCommit
        /// The commit lands, but its reply is lost: the loop sees a failure and retries.
        case loseCommitReply
    }

    private let inner: any ConsumerStore
    private let lock = NSLock()
    private var faults: [Int: Fault]
    private var attempts = 0
    private let commitDelay: Duration?
    /// Runs before each commit attempt with its number (1-based), e.g. to let another instance claim.
    private let beforeCommit: (@Sendable (Int) -> Void)?

    /// - Parameters:
    ///   - faults: by commit attempt number (1-based), what goes wrong.
    ///   - commitDelay: a pause before every commit, so a batch is in flight while the loop polls.
    public init(_ inner: any ConsumerStore, faults: [Int: Fault] = [:], commitDelay: Duration? = nil,
                beforeCommit: (@Sendable (Int) -> Void)? = nil) {
        self.inner = inner
        self.faults = faults
        self.commitDelay = commitDelay
        self.beforeCommit = beforeCommit
    }

    /// Commit attempts so far, failed ones included.
    public var commitAttempts: Int { lock.withLock { attempts } }

    public func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] { try inner.claim(partitions) }

    public func commit(_ batch: PreparedBatch) throws -> CommitOutcome {
        let (attempt, fault) = lock.withLock { () -> (Int, Fault?) in
            attempts += 1
            return (attempts, faults.removeValue(forKey: attempts))
        }
        beforeCommit?(attempt)
        if let commitDelay { Thread.sleep(forTimeInterval: commitDelay.totalSeconds) }
        switch fault {
        case .failBeforeCommit?:
            throw TransientStoreFailure("connection lost before commit \(attempt)")
        case .loseCommitReply?:
            _ = try inner.commit(batch)
            throw TransientStoreFailure("reply of commit \(attempt) lost")
        case nil:
            return try inner.commit(batch)
        }
    }

    public func idleUpkeep() throws { try inner.idleUpkeep() }

    public func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        try inner.recordLogGap(partition: partition, storedOffset: storedOffset, logEnd: logEnd)
    }

    public func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] { try inner.recordedLogGaps(partitions) }
}
