import Foundation
import TallyCore
import XCTest

/// The dedup horizon with the real executables, broker and PostgreSQL: record timestamps that
/// move 40 days past the first events make copies of those events, and a new event as old,
/// dead letters with their reason in both consumers (restarted in between, so the clocks they
/// judge by are the ones stored), while an event 34 days late counts; the replays of both
/// consumers decide alike and reconcile finds nothing amiss.
final class DedupHorizonIntegrationTests: XCTestCase {
    func testEventsPastTheHorizonAreRefusedWithTheirReasonAndReplaysDecideAlike() async throws {
        let harness = try AggregatorHarness()
        try RaterIntegrationTests.applyPrices(harness)
        let day: Int64 = 86_400_000
        let start: Int64 = 1_793_491_200_000  // 2026-11-01T00:00:00Z, the generated events' first time
        let events = AggregatorHarness.events(count: 400, seed: 91, customers: 8)
        // Stamped as they happened: the log clock follows the events.
        var stream = events.map { (event: $0, timestamp: $0.time.microseconds / 1000) }
        // Every customer's partition moves 40 days on.
        var jumps: [UsageEvent] = []
        for customer in Set(events.map(\.subject)).sorted() {
            var jump = events.first { $0.subject == customer }!
            jump.id = "jump-\(customer)"
            jump.time = EventTime(microseconds: (start + 40 * day) * 1000)
            jumps.append(jump)
            stream.append((jump, start + 40 * day))
        }
        try await harness.publish(stream)
        let horizon = ["--dedup-horizon-days", "35"]
        let aggregatorGroup = harness.group + "-aggregator"
        for (name, process) in [("rater", try harness.startRater(horizon + ["--exit-when-caught-up"])),
                                ("aggregator", try harness.startAggregator(horizon + ["--group", aggregatorGroup, "--exit-when-caught-up"]))] {
            XCTAssertEqual(process.wait(timeout: .seconds(120)), 0, "\(name): \(process.log)")
        }

        // Then, stamped as old as the first events (producers whose clocks are 40 days behind):
        // only the clocks the consumers stored, read back when they claim, refuse these.
        var backdated = events[5]
        backdated.id = "backdated"
        var late = events[6]
        late.id = "late-34-days"
        late.time = EventTime(microseconds: (start + 6 * day) * 1000)
        try await harness.publish(events.prefix(30).map { ($0, start) } + [(backdated, start), (late, start + 2)])
        let rater = try harness.startRater(horizon)
        let aggregator = try harness.startAggregator(horizon + ["--group", aggregatorGroup])
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertTrue(try harness.waitUntilConsumed(group: aggregatorGroup), aggregator.log)

        // The test's own count: everything but the copies and the backdated event, once.
        try harness.assertTotals(equal: AggregatorHarness.recount(events + jumps + [late]))
        for group in [aggregatorGroup, harness.group] {
            let letters = try harness.connection.query("""
                SELECT reason_code, count(*), min(reason) FROM tally.dead_letters WHERE consumer_group = $1 GROUP BY 1
                """, [group])
            XCTAssertEqual(letters.rows.map { Array($0.prefix(2)) }, [["past_dedup_horizon", "31"]], group)
            XCTAssertTrue(letters.rows.first?[2]?.contains("is more than 35 days before the partition's log time") ?? false,
                          "\(letters.rows)")
            // Each partition's clock: the greatest timestamp on it, the jump's.
            let clocks = try harness.connection.query("""
                SELECT DISTINCT log_clock_ms FROM tally.consumer_offsets WHERE consumer_group = $1
                """, [group]).rows
            XCTAssertEqual(clocks, [[String(start + 40 * day)]])
        }
        // The rater took what the aggregator counted: 400 + 8 + 1 events.
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.rater_event_keys").scalar, "409")
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.usage_event_keys").scalar, "409")
        let status = try harness.tally(["status", "--topic", harness.topic])
        XCTAssertTrue(status.contains("past_dedup_horizon"), status)

        for (consumer, live) in [("aggregator", aggregatorGroup), ("rater", harness.group)] {
            let (code, output) = try harness.tallyStatus(["replay", "--topic", harness.topic, "--live-group", live, "--dry-run",
                                                          "--consumer", consumer] + horizon)
            XCTAssertEqual(code, 0, output)
            XCTAssertTrue(output.contains("identical: the replay rebuilt the live state exactly"), output)
        }
        let reconcile = try harness.tallyStatus(["reconcile", "--topic", harness.topic, "--aggregator-group", aggregatorGroup,
                                                 "--rater-group", harness.group])
        XCTAssertEqual(reconcile.status, 0, reconcile.output)
        // A process that would decide with another horizon does not start.
        let (code, output) = try harness.tallyStatus(["replay", "--topic", harness.topic, "--live-group", aggregatorGroup, "--dry-run",
                                                      "--consumer", "aggregator", "--dedup-horizon-days", "30"])
        XCTAssertNotEqual(code, 0)
        XCTAssertTrue(output.contains("deduplicated over a horizon of 35 days"), output)
    }
}
