import TallyCore
import XCTest

/// The dedup horizon's rule on its own: where its boundary falls, extreme clocks and times, and
/// the log clock as a running maximum that any split of the log reproduces.
final class DedupHorizonTests: XCTestCase {
    let horizon = DedupHorizon(days: 35)
    let day: Int64 = 86_400_000_000  // µs

    func testTheBoundaryIsExactlyTheHorizonBeforeTheLogClock() throws {
        let clock: Int64 = 1_796_083_200_000  // 2026-12-01T00:00:00Z, ms
        let oldest = clock * 1000 - 35 * day  // 2026-10-27T00:00:00Z
        XCTAssertNil(horizon.refusal(eventTime: EventTime(microseconds: oldest), logClockMilliseconds: clock), "exactly 35 days late counts")
        let refusal = try XCTUnwrap(horizon.refusal(eventTime: EventTime(microseconds: oldest - 1), logClockMilliseconds: clock))
        XCTAssertEqual(refusal.code, "past_dedup_horizon")
        XCTAssertTrue(refusal.detail.hasPrefix("time 2026-10-26T23:59:59.999999Z is more than 35 days before the partition's log time 2026-12-01T00:00:00Z"),
                      refusal.detail)
        XCTAssertNil(horizon.refusal(eventTime: EventTime(microseconds: clock * 1000 + day), logClockMilliseconds: clock), "the future is not the horizon's")
        XCTAssertNil(horizon.refusal(eventTime: EventTime(microseconds: 0), logClockMilliseconds: nil), "no timestamp yet: nothing to measure from")
        XCTAssertTrue(PoisonReason.codes.contains(DedupHorizon.reasonCode), "metrics start the code at zero")
    }

    /// Any clock Kafka can carry and any time the schema accepts: an answer, never a trap.
    func testExtremeClocksAndTimesAnswerWithoutTrapping() {
        let times = [EventTime.supportedRange.lowerBound, -1, 0, 1, EventTime.supportedRange.upperBound].map { EventTime(microseconds: $0) }
        let clocks: [Int64] = [.min, .min + 1, -1, 0, 1, 253_402_300_799_999, 253_402_300_800_000, .max - 1, .max]
        for clock in clocks {
            for time in times {
                let refusal = horizon.refusal(eventTime: time, logClockMilliseconds: clock)
                // The test's own arithmetic, in 128 bits.
                let late = Int128(clock) * 1000 - Int128(time.microseconds) > Int128(35) * Int128(day)
                XCTAssertEqual(refusal != nil, late, "clock \(clock) ms, time \(time)")
            }
        }
        for days in [1, DedupHorizon.maxDays] {
            XCTAssertNotNil(DedupHorizon(days: days).refusal(eventTime: times[0], logClockMilliseconds: .max))
        }
    }

    /// The clock after a log is the greatest timestamp in it, whatever batches it was read in
    /// and wherever timestamps are missing.
    func testTheLogClockIsTheRunningMaximumOverAnySplit() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<500 {
            let count = Int.random(in: 0...40, using: &generator)
            let stamps: [Int64?] = (0..<count).map { _ in
                Bool.random(using: &generator) ? nil : Int64.random(in: Int64.min...Int64.max, using: &generator) / Int64.random(in: 1...1_000_000, using: &generator)
            }
            let expected = stamps.compactMap { $0 }.max()
            var whole: Int64?
            for stamp in stamps { whole = DedupHorizon.advance(whole, by: stamp) }
            XCTAssertEqual(whole, expected)
            // Split at random points: each batch starts from the clock the previous one stored.
            var stored: Int64?
            var index = 0
            while index < stamps.count {
                let end = min(stamps.count, index + Int.random(in: 1...7, using: &generator))
                var clock = stored
                for stamp in stamps[index..<end] { clock = DedupHorizon.advance(clock, by: stamp) }
                stored = clock
                index = end
            }
            XCTAssertEqual(stored, expected)
        }
    }
}
