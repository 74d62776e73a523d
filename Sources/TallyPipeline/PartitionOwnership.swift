/// Which partitions a consumer instance owns and where it stands on each, as a value: the
/// consumer loop tells it what happened (partitions claimed or revoked, a batch prepared, a
/// commit's outcome) and it answers with what the loop must do (where to fetch from). No I/O,
/// so each transition is tested on its own (`PartitionOwnershipTests`).
///
/// Per owned partition it keeps the claim (the owner epoch and the committed position) and the
/// read position, where the next prepared batch starts: ahead of the committed position while a
/// batch is in flight, equal to it otherwise.
public struct PartitionOwnership: Sendable, Equatable {
    /// Owned partitions: the epoch claimed and the committed position.
    public private(set) var claims: [Int32: PartitionClaim] = [:]
    /// Where the next prepared batch starts, per owned partition.
    public private(set) var readPositions: [Int32: Int64] = [:]
    /// The log clock at each read position (see `DedupHorizon`); absent before any timestamp.
    public private(set) var readClocks: [Int32: Int64] = [:]

    public init() {}

    /// What the loop does after a transition.
    public enum Action: Sendable, Equatable {
        /// Fetch these partitions from these offsets.
        case seek([Int32: Int64])
    }

    /// What became of a batch's commit (`ConsumerStore.commit`, through the commit lanes).
    public struct CommitResult: Sendable, Equatable {
        /// Partitions committed, each with the offset it moved to.
        public var committed: [Int32: Int64] = [:]
        /// Partitions another instance claimed since: their records are not ours to write.
        public var fenced: Set<Int32> = []
        /// The log clocks the committed partitions moved to, where they have one.
        public var committedClocks: [Int32: Int64] = [:]
        /// Partitions whose stored offset moved under our own epoch (an earlier commit whose
        /// reply was lost landed after all), with the stored position.
        public var resync: [Int32: PartitionClaim] = [:]
        /// Not written at all (the loop stopped while the database or broker was away).
        public var abandoned = false

        public init(committed: [Int32: Int64] = [:], committedClocks: [Int32: Int64] = [:], fenced: Set<Int32> = [],
                    resync: [Int32: PartitionClaim] = [:], abandoned: Bool = false) {
            self.committed = committed
            self.committedClocks = committedClocks
            self.fenced = fenced
            self.resync = resync
            self.abandoned = abandoned
        }
    }

    /// Partitions claimed in PostgreSQL (epoch bumped, stored offset read): they are owned from
    /// their stored offsets, never Kafka's.
    public mutating func claimed(_ newClaims: [Int32: PartitionClaim]) -> Action {
        for (partition, claim) in newClaims {
            claims[partition] = claim
            readPositions[partition] = claim.nextOffset
            readClocks[partition] = claim.logClock
        }
        return .seek(newClaims.mapValues(\.nextOffset))
    }

    /// Partitions revoked or lost in a rebalance (no batch is in flight then): no longer owned.
    public mutating func revoked(_ partitions: some Sequence<Int32>) {
        for partition in partitions {
            claims.removeValue(forKey: partition)
            readPositions.removeValue(forKey: partition)
            readClocks.removeValue(forKey: partition)
        }
    }

    /// Where a batch taking records of `partition` starts, with the claim it commits under and
    /// the log clock there; nil when the partition is not owned (its records are skipped, never
    /// committed).
    @inline(__always)
    public func start(of partition: Int32) -> (claim: PartitionClaim, offset: Int64, logClock: Int64?)? {
        guard let claim = claims[partition], let offset = readPositions[partition] else { return nil }
        return (claim, offset, readClocks[partition])
    }

    /// A batch was prepared with these moves and log clocks: the next one starts where it ends.
    public mutating func prepared(_ moves: [Int32: (expected: Int64, next: Int64, epoch: Int64)], logClocks: [Int32: Int64] = [:]) {
        for (partition, move) in moves { readPositions[partition] = move.next }
        for (partition, clock) in logClocks where moves[partition] != nil { readClocks[partition] = clock }
    }

    /// Applies a batch's commit. Committed partitions move their committed position; fenced
    /// ones are given up; resynced ones resume from the stored offset (seek there); an
    /// abandoned batch's partitions are read again from their committed positions.
    /// - Parameter partitions: the partitions the batch moved.
    public mutating func applied(_ result: CommitResult, partitions: some Sequence<Int32>) -> Action? {
        if result.abandoned {
            for partition in partitions {
                readPositions[partition] = claims[partition]?.nextOffset
                readClocks[partition] = claims[partition]?.logClock
            }
            return nil
        }
        for (partition, next) in result.committed {
            claims[partition]?.nextOffset = next
            if let clock = result.committedClocks[partition] { claims[partition]?.logClock = clock }
        }
        revoked(result.fenced)
        guard !result.resync.isEmpty else { return nil }
        for (partition, stored) in result.resync where claims[partition] != nil {
            claims[partition]?.nextOffset = stored.nextOffset
            claims[partition]?.logClock = stored.logClock
            readPositions[partition] = stored.nextOffset
            readClocks[partition] = stored.logClock
        }
        return .seek(result.resync.mapValues(\.nextOffset))
    }

}
