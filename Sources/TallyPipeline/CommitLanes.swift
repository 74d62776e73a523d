import TallyCore

/// Commits each batch over several stores at once, each with its own PostgreSQL connection and
/// its own share of the partitions (partition modulo the number of lanes).
///
/// Every lane's transaction moves only its own partitions' offsets together with their effects,
/// so each is exactly-once on its own (fenced per partition as before). A customer lives on one
/// partition, so lanes write disjoint rows; if a foreign producer broke that, two lanes would
/// wait on each other's row locks, and a deadlock is a retryable error. What the lanes buy is
/// the second core: one server process per lane, and one lane's rating while another's COPY runs.
public final class CommitLanes: ConsumerStore, @unchecked Sendable {
    private let lanes: [any ConsumerStore]
    /// Lanes that committed while another did not (fenced, resynced or failed): when the loop
    /// asks again for the rest of the batch, these are reported, not written twice.
    private var landed: [Int: (moves: [Int32: LaneMove], summary: DedupSummary)] = [:]

    private struct LaneMove: Equatable {
        let expected: Int64
        let next: Int64
    }

    public init(_ lanes: [any ConsumerStore]) {
        precondition(!lanes.isEmpty)
        self.lanes = lanes
    }

    private func lane(of partition: Int32) -> Int { Int(partition) % lanes.count }

    public func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] {
        landed.removeAll()
        var claims: [Int32: PartitionClaim] = [:]
        for (index, store) in lanes.enumerated() {
            let mine = partitions.filter { lane(of: $0) == index }
            if !mine.isEmpty { claims.merge(try store.claim(mine)) { $1 } }
        }
        return claims
    }

    public func commit(_ batch: PreparedBatch) throws -> CommitOutcome {
        var summary = DedupSummary()
        var work: [(lane: Int, batch: PreparedBatch, moves: [Int32: LaneMove])] = []
        for index in lanes.indices {
            let others = Set(batch.moves.keys.filter { lane(of: $0) != index })
            let part = batch.removing(others)
            guard !part.moves.isEmpty else { continue }
            let moves = part.moves.mapValues { LaneMove(expected: $0.expected, next: $0.next) }
            if let earlier = landed[index], earlier.moves == moves {
                summary.add(earlier.summary)
            } else {
                work.append((index, part, moves))
            }
        }
        landed = landed.filter { index, _ in !work.contains { $0.lane == index } }
        let results = runConcurrently(work.map { item in { try self.lanes[item.lane].commit(item.batch) } })
        var fenced = Set<Int32>()
        var resync: [Int32: PartitionClaim] = [:]
        var failure: (any Error)?
        for (item, result) in zip(work, results) {
            switch result {
            case .success(.committed(let laneSummary)):
                landed[item.lane] = (item.moves, laneSummary)
                summary.add(laneSummary)
            case .success(.fenced(let partitions)): fenced.formUnion(partitions)
            case .success(.resync(let offsets)): resync.merge(offsets) { $1 }
            case .failure(let error): failure = failure ?? error
            }
        }
        if let failure { throw failure }
        if !fenced.isEmpty { return .fenced(fenced) }
        if !resync.isEmpty { return .resync(resync) }
        landed.removeAll()
        return .committed(summary)
    }

    public func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        try lanes[lane(of: partition)].recordLogGap(partition: partition, storedOffset: storedOffset, logEnd: logEnd)
    }

    public func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] {
        var gaps: [Int32: Int64] = [:]
        for (index, store) in lanes.enumerated() {
            let mine = partitions.filter { lane(of: $0) == index }
            if !mine.isEmpty { gaps.merge(try store.recordedLogGaps(mine)) { $1 } }
        }
        return gaps
    }

    public func idleUpkeep() throws {
        for lane in lanes { try lane.idleUpkeep() }
    }

    /// Runs each job on its own thread but the last, which runs on this one.
    private func runConcurrently(_ jobs: [() throws -> CommitOutcome]) -> [Result<CommitOutcome, any Error>] {
        guard let last = jobs.last else { return [] }
        let others = jobs.dropLast().map { BackgroundJob($0) }
        let lastResult = Result { try last() }
        return others.map { $0.wait() } + [lastResult]
    }
}

extension DedupSummary {
    mutating func add(_ other: DedupSummary) {
        accepted += other.accepted
        duplicates += other.duplicates
        conflicts += other.conflicts
        deadLetters += other.deadLetters
        grants += other.grants
        unpriced += other.unpriced
        unrateable += other.unrateable
    }
}
