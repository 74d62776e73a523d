import Foundation
import TallyCore
import TallyPipeline
import TallyPostgres

/// The fault suite's faults for a consumer, as a decorator around its store: deliberate breaks of
/// one invariant each (so the suite can show its checks catch them) and fault knobs. Only the
/// test-only `tally-faults` executable links this; the production consumers have no such paths.
///
/// From the environment of `tally-faults`:
/// - `TALLY_DEBUG_BREAK=dedup,fencing,drop,phantom,dead-letters,wallet` (comma-separated);
/// - `TALLY_FAULT_COMMIT_DELAY_MS`: a pause before every commit, so a SIGSTOP lands while a batch
///   is in flight;
/// - `TALLY_FAULT_KILL_AFTER_COMMITS`: SIGKILL the process right after its n-th commit returns.
public struct ConsumerFaults: Sendable {
    public enum Break: String, Sendable, CaseIterable {
        /// Events seen before are counted again (each event gets an id of its own).
        case dedup
        /// Offsets move without the compare-and-set: a zombie's stale batch lands.
        case fencing
        /// Every 50th usage event (by offset) is left out while its offset still moves.
        case drop
        /// Each aggregator batch counts one made-up event that was never published.
        case phantom
        /// Dead letters are not recorded in `tally.dead_letters` (they still reach the topic).
        case deadLetters = "dead-letters"
        /// The rater credits no grants.
        case wallet
    }

    public var breaks: Set<Break> = []
    public var commitDelay: Duration?
    public var killAfterCommits: Int?

    public init(breaks: Set<Break> = [], commitDelay: Duration? = nil, killAfterCommits: Int? = nil) {
        self.breaks = breaks
        self.commitDelay = commitDelay
        self.killAfterCommits = killAfterCommits
    }

    public static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment) -> ConsumerFaults {
        ConsumerFaults(breaks: Set((environment["TALLY_DEBUG_BREAK"] ?? "").split(separator: ",").compactMap { Break(rawValue: String($0)) }),
                       commitDelay: environment["TALLY_FAULT_COMMIT_DELAY_MS"].flatMap(Int.init).map { .milliseconds($0) },
                       killAfterCommits: environment["TALLY_FAULT_KILL_AFTER_COMMITS"].flatMap(Int.init))
    }

    /// The store with these faults, or the store itself when there are none.
    /// - Parameter connect: opens a PostgreSQL connection of the decorator's own (the fencing break).
    public func decorate(_ store: any ConsumerStore, settings: ConsumerSettings,
                         connect: () throws -> PostgresConnection) throws -> any ConsumerStore {
        guard !breaks.isEmpty || commitDelay != nil || killAfterCommits != nil else { return store }
        return BrokenStore(inner: store, faults: self, settings: settings,
                           fencingConnection: breaks.contains(.fencing) ? try connect() : nil)
    }
}

/// See `ConsumerFaults`.
final class BrokenStore: ConsumerStore, @unchecked Sendable {
    private let inner: any ConsumerStore
    private let faults: ConsumerFaults
    private let settings: ConsumerSettings
    private let fencingConnection: PostgresConnection?
    private var commits = 0

    init(inner: any ConsumerStore, faults: ConsumerFaults, settings: ConsumerSettings, fencingConnection: PostgresConnection?) {
        self.inner = inner
        self.faults = faults
        self.settings = settings
        self.fencingConnection = fencingConnection
    }

    func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] { try inner.claim(partitions) }
    func idleUpkeep() throws { try inner.idleUpkeep() }
    func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        try inner.recordLogGap(partition: partition, storedOffset: storedOffset, logEnd: logEnd)
    }
    func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] { try inner.recordedLogGaps(partitions) }

    func commit(_ batch: PreparedBatch) throws -> CommitOutcome {
        if let delay = faults.commitDelay {
            Thread.sleep(forTimeInterval: delay.totalSeconds)
        }
        var batch = batch
        if faults.breaks.contains(.drop) { batch.events.removeAll { $0.position.offset % 50 == 0 } }
        if faults.breaks.contains(.dedup) {
            batch.events = batch.events.map { positioned in
                var event = positioned.event
                event.id += "#\(positioned.position.partition)-\(positioned.position.offset)"
                return PositionedEvent(event: event, position: positioned.position)
            }
        }
        if faults.breaks.contains(.phantom), settings.metricsPrefix == "tally_aggregator", let first = batch.events.first {
            var madeUp = first.event
            madeUp.id += "-phantom-\(first.position.offset)"
            batch.events.insert(PositionedEvent(event: madeUp, position: first.position), at: 1)
        }
        if faults.breaks.contains(.deadLetters) { batch.deadLetters = [] }
        if faults.breaks.contains(.wallet) { batch.grants = [] }
        let restoreEpochs = try forceOffsets(batch)
        defer { try? restoreEpochs() }
        let outcome = try inner.commit(batch)
        if case .committed = outcome {
            commits += 1
            if commits == faults.killAfterCommits { kill(getpid(), SIGKILL) }
        }
        return outcome
    }

    /// The fencing break: set each moved partition's stored offset and epoch to what this batch
    /// expects, so the store's compare-and-set passes whoever owns the partition now; afterwards
    /// the owner's epoch goes back where this batch's is still there, so only the offset moved (as a
    /// commit without the check would) and a claim made meanwhile stands.
    private func forceOffsets(_ batch: PreparedBatch) throws -> () throws -> Void {
        guard let connection = fencingConnection, !batch.moves.isEmpty else { return {} }
        let partitions = batch.moves.keys.sorted()
        let saved = try connection.query("""
            SELECT partition, owner_epoch FROM tally.consumer_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])
            """, [settings.group, settings.topic, PostgresArray(partitions)])
        var epochs: [Int32: Int64] = [:]
        for row in 0..<saved.rowCount { epochs[try saved.value(row, 0, as: Int32.self)] = try saved.value(row, 1, as: Int64.self) }
        try connection.query("""
            UPDATE tally.consumer_offsets AS o SET next_offset = m.expected, owner_epoch = m.epoch
            FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS m(partition, expected, epoch)
            WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = m.partition
            """, [settings.group, settings.topic, PostgresArray(partitions), PostgresArray(partitions.map { batch.moves[$0]!.expected }),
                  PostgresArray(partitions.map { batch.moves[$0]!.epoch })])
        return { [settings] in
            let kept = epochs.keys.sorted()
            try connection.query("""
                UPDATE tally.consumer_offsets AS o SET owner_epoch = m.epoch
                FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS m(partition, epoch, forced)
                WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = m.partition AND o.owner_epoch = m.forced
                """, [settings.group, settings.topic, PostgresArray(kept), PostgresArray(kept.map { epochs[$0]! }),
                      PostgresArray(kept.map { batch.moves[$0]!.epoch })])
        }
    }
}
