import TallyPipeline
import XCTest

/// Each transition of partition ownership on its own: what is owned, where the next batch
/// starts, and where the loop must fetch from, after a claim, a batch, and each commit outcome.
final class PartitionOwnershipTests: XCTestCase {
    typealias Move = (expected: Int64, next: Int64, epoch: Int64)

    func owning(_ claims: [Int32: PartitionClaim]) -> PartitionOwnership {
        var ownership = PartitionOwnership()
        XCTAssertEqual(ownership.claimed(claims), .seek(claims.mapValues(\.nextOffset)), "a claim fetches from the stored offsets")
        return ownership
    }

    func testAClaimOwnsFromTheStoredOffsetAndABatchMovesOnlyTheReadPosition() {
        var ownership = owning([0: PartitionClaim(epoch: 3, nextOffset: 100), 1: PartitionClaim(epoch: 3, nextOffset: 7)])
        XCTAssertEqual(ownership.start(of: 0)?.offset, 100)
        XCTAssertEqual(ownership.start(of: 0)?.claim.epoch, 3)
        XCTAssertNil(ownership.start(of: 2), "records of a partition not owned are not taken")
        ownership.prepared([0: (expected: 100, next: 150, epoch: 3)] as [Int32: Move])
        XCTAssertEqual(ownership.start(of: 0)?.offset, 150, "the next batch starts where the one in flight ends")
        XCTAssertEqual(ownership.claims[0]?.nextOffset, 100, "nothing is committed yet")
        XCTAssertNil(ownership.applied(.init(committed: [0: 150]), partitions: [0]))
        XCTAssertEqual(ownership.claims[0]?.nextOffset, 150)
        XCTAssertEqual(ownership.readPositions, [0: 150, 1: 7])
    }

    func testAFencedPartitionIsGivenUpAndTheOthersKeepTheirCommit() {
        var ownership = owning([0: PartitionClaim(epoch: 1, nextOffset: 0), 1: PartitionClaim(epoch: 1, nextOffset: 0)])
        ownership.prepared([0: (expected: 0, next: 10, epoch: 1), 1: (expected: 0, next: 20, epoch: 1)] as [Int32: Move])
        XCTAssertNil(ownership.applied(.init(committed: [1: 20], fenced: [0]), partitions: [0, 1]))
        XCTAssertNil(ownership.start(of: 0), "another instance claimed it")
        XCTAssertEqual(ownership.claims, [1: PartitionClaim(epoch: 1, nextOffset: 20)])
    }

    func testAResyncResumesFromTheStoredOffset() {
        var ownership = owning([0: PartitionClaim(epoch: 2, nextOffset: 40)])
        ownership.prepared([0: (expected: 40, next: 90, epoch: 2)] as [Int32: Move])
        // An earlier commit whose reply was lost landed: the stored offset is 60, not 40.
        XCTAssertEqual(ownership.applied(.init(resync: [0: PartitionClaim(epoch: 2, nextOffset: 60, logClock: 7_000)]), partitions: [0]),
                       .seek([0: 60]))
        XCTAssertEqual(ownership.claims[0], PartitionClaim(epoch: 2, nextOffset: 60, logClock: 7_000))
        XCTAssertEqual(ownership.start(of: 0)?.offset, 60)
        XCTAssertEqual(ownership.start(of: 0)?.logClock, 7_000, "the log clock stored with that offset")
    }

    /// The log clock (`DedupHorizon`) travels with the position: ahead while a batch is in
    /// flight, committed with it, back to the committed one when a batch is abandoned.
    func testTheLogClockMovesWithThePosition() {
        var ownership = owning([0: PartitionClaim(epoch: 1, nextOffset: 10, logClock: 1_000), 1: PartitionClaim(epoch: 1, nextOffset: 0)])
        XCTAssertEqual(ownership.start(of: 0)?.logClock, 1_000)
        XCTAssertNil(ownership.start(of: 1)?.logClock, "no timestamp read yet")
        ownership.prepared([0: (expected: 10, next: 20, epoch: 1), 1: (expected: 0, next: 5, epoch: 1)] as [Int32: Move], logClocks: [0: 2_000])
        XCTAssertEqual(ownership.start(of: 0)?.logClock, 2_000, "the next batch starts from the clock the one in flight ends with")
        XCTAssertNil(ownership.start(of: 1)?.logClock, "a batch of records without timestamps leaves the clock unset")
        XCTAssertEqual(ownership.claims[0]?.logClock, 1_000)
        XCTAssertNil(ownership.applied(.init(committed: [0: 20, 1: 5], committedClocks: [0: 2_000]), partitions: [0, 1]))
        XCTAssertEqual(ownership.claims[0], PartitionClaim(epoch: 1, nextOffset: 20, logClock: 2_000))
        ownership.prepared([0: (expected: 20, next: 30, epoch: 1)] as [Int32: Move], logClocks: [0: 3_000])
        XCTAssertNil(ownership.applied(.init(abandoned: true), partitions: [0]))
        XCTAssertEqual(ownership.start(of: 0)?.logClock, 2_000, "an abandoned batch is read again from the committed clock")
        XCTAssertEqual(ownership.start(of: 0)?.offset, 20)
    }

    func testAnAbandonedBatchIsReadAgainFromTheCommittedPosition() {
        var ownership = owning([0: PartitionClaim(epoch: 1, nextOffset: 5), 1: PartitionClaim(epoch: 1, nextOffset: 9)])
        ownership.prepared([0: (expected: 5, next: 50, epoch: 1)] as [Int32: Move])
        XCTAssertNil(ownership.applied(.init(committed: [0: 50], abandoned: true), partitions: [0]))
        XCTAssertEqual(ownership.claims[0]?.nextOffset, 5, "an abandoned batch commits nothing")
        XCTAssertEqual(ownership.readPositions, [0: 5, 1: 9])
    }

    func testARevokedPartitionIsNoLongerOwnedAndAClaimAgainStartsFromItsStoredOffset() {
        var ownership = owning([0: PartitionClaim(epoch: 1, nextOffset: 5), 1: PartitionClaim(epoch: 1, nextOffset: 9)])
        ownership.revoked([1])
        XCTAssertEqual(Set(ownership.claims.keys), [0])
        XCTAssertNil(ownership.start(of: 1))
        XCTAssertEqual(ownership.claimed([1: PartitionClaim(epoch: 4, nextOffset: 30)]), .seek([1: 30]))
        XCTAssertEqual(ownership.start(of: 1)?.claim.epoch, 4, "a new claim carries its new epoch")
        XCTAssertEqual(ownership.start(of: 1)?.offset, 30)
    }
}
