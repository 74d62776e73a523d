import Foundation
import TallyCore
import TallyPipeline
import XCTest

/// The read API's cursors and windows: pure logic, fast.
final class PageCursorTests: XCTestCase {
    func testCursorsRoundTripAnyTextAndRefuseAnythingElse() {
        var generator = SystemRandomNumberGenerator()
        let alphabet: [Character] = ["a", "Z", "0", "-", "_", "/", "+", "=", " ", "é", "😀", "\u{1}", "\u{1e}", "\""]
        for _ in 0..<500 {
            let parts = (0..<Int.random(in: 1...3, using: &generator)).map { _ in
                String((0..<Int.random(in: 0...40, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! })
            }
            let cursor = PageCursor.encode(parts)
            XCTAssertTrue(cursor.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }, cursor)
            XCTAssertEqual(PageCursor.decode(cursor, count: parts.count), parts)
            XCTAssertNil(PageCursor.decode(cursor, count: parts.count + 1), "a cursor of another list is refused")
        }
        for garbage in ["", "!!", "a b", "%00", String(repeating: "A", count: 4000), "////", "=="] {
            XCTAssertNil(PageCursor.decode(garbage, count: 2), garbage)
        }
        // Parts that are numbers in the list's key read back exactly, extremes included.
        XCTAssertEqual(PageCursor.decode(PageCursor.encode([String(Int64.min), String(Int64.max)]), count: 2), [String(Int64.min), String(Int64.max)])
    }

    /// Window ends worked out on a calendar: December runs into January, a leap February has 29
    /// days, and windows before 1970 end where the next begins.
    func testWindowEndsAreTheNextWindowsStart() throws {
        func time(_ text: String) throws -> Int64 { try XCTUnwrap(EventTime(text)).microseconds }
        XCTAssertEqual(Granularity.month.windowEnd(try time("2026-12-31T23:59:59Z")), try time("2027-01-01T00:00:00Z"))
        XCTAssertEqual(Granularity.month.windowEnd(try time("2028-02-10T00:00:00Z")), try time("2028-03-01T00:00:00Z"))
        XCTAssertEqual(Granularity.month.windowEnd(try time("1969-12-15T00:00:00Z")), try time("1970-01-01T00:00:00Z"))
        XCTAssertEqual(Granularity.day.windowEnd(try time("1969-12-31T12:00:00Z")), try time("1970-01-01T00:00:00Z"))
        XCTAssertEqual(Granularity.hour.windowEnd(try time("2026-11-30T23:30:00Z")), try time("2026-12-01T00:00:00Z"))
        for granularity in Granularity.allCases {
            for _ in 0..<200 {
                let t = Int64.random(in: -2_000_000_000_000_000...4_000_000_000_000_000)
                let end = granularity.windowEnd(t)
                XCTAssertGreaterThan(end, t)
                XCTAssertEqual(granularity.windowStart(end), end, "\(granularity) \(t)")
                XCTAssertEqual(granularity.windowStart(end - 1), granularity.windowStart(t))
            }
        }
    }
}
