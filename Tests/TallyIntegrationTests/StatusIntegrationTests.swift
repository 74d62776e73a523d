import Foundation
import TallyCore
import XCTest

/// `tally status` against the real stack: stored offsets, true log ends, lag and its threshold.
final class StatusIntegrationTests: XCTestCase {
    func rows(_ output: String) -> [[String]] {
        output.split(separator: "\n").map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
            .filter { $0.count == 8 && $0[0] != "group" }
    }

    func testStatusShowsPositionsLogEndsAndLag() async throws {
        let harness = try AggregatorHarness()
        try await harness.publish(AggregatorHarness.events(count: 2_000, seed: 91, customers: 30))
        let aggregator = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        let arguments = ["status", "--topic", harness.topic, "--group", harness.group, "--format", "csv"]
        let caughtUp = try harness.tallyStatus(arguments + ["--max-lag", "0"])
        XCTAssertEqual(caughtUp.status, 0, caughtUp.output)
        let before = rows(caughtUp.output)
        XCTAssertEqual(before.count, 4, caughtUp.output)
        for row in before {
            let partition = Int32(row[1])!
            XCTAssertEqual(Int64(row[3]), harness.logEnd[partition], "log end of partition \(partition) is the true one\n\(caughtUp.output)")
            XCTAssertEqual(row[4], "0")
            XCTAssertFalse(row[5].isEmpty, "last commit time")
            XCTAssertFalse(row[6].isEmpty, "owning instance")
            XCTAssertTrue(row[7].hasPrefix("20"), "the partition's log clock, a time\n\(caughtUp.output)")
        }
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0)

        try await harness.publish(AggregatorHarness.events(count: 123, seed: 92, customers: 30, prefix: "late"))
        let behind = try harness.tallyStatus(arguments + ["--max-lag", "10"])
        XCTAssertEqual(behind.status, 1, "a lag above the threshold exits 1\n\(behind.output)")
        XCTAssertEqual(rows(behind.output).reduce(0) { $0 + Int($1[4])! }, 123, behind.output)
        XCTAssertTrue(behind.output.contains("exceeds --max-lag 10"), behind.output)
    }
}
