import TallyCore
import XCTest

/// The console's figures, axes and escaping, with extreme values: nothing a page shows may trap.
final class ConsoleHTMLTests: XCTestCase {
    func testFiguresAreGroupedAndMoneyRoundsToTheMinorUnit() throws {
        XCTAssertEqual(ConsoleHTML.grouped(0), "0")
        XCTAssertEqual(ConsoleHTML.grouped(999), "999")
        XCTAssertEqual(ConsoleHTML.grouped(1000), "1,000")
        XCTAssertEqual(ConsoleHTML.grouped(-1_234_567), "-1,234,567")
        XCTAssertEqual(ConsoleHTML.grouped(Int128.min), "-170,141,183,460,469,231,731,687,303,715,884,105,728")
        let usd = try XCTUnwrap(Currency("USD")), jpy = try XCTUnwrap(Currency("JPY"))
        XCTAssertEqual(ConsoleHTML.money(1_234_567_890_000, usd), "USD 1,234.57")  // 1,234.56789 rounds half up
        XCTAssertEqual(ConsoleHTML.money(-5_000_000, usd), "USD -0.01")           // -0.005 rounds away from zero
        XCTAssertEqual(ConsoleHTML.money(1_500_000_000_000, jpy), "JPY 1,500")
        XCTAssertEqual(ConsoleHTML.money(Int128(Int64.max), usd), "USD 9,223,372,036.85")
        XCTAssertEqual(ConsoleHTML.compact(1_500_000), "1.5M")
        XCTAssertEqual(ConsoleHTML.compact(250_000), "250k")
        XCTAssertEqual(ConsoleHTML.compact(999), "999")
    }

    /// Axis tops are 1, 2 or 5 times a power of ten times the step count, never below the
    /// highest bar, with 4 to 10 steps; worked out by hand for the fixed cases.
    func testAxesAreRoundAndHoldTheHighestBar() {
        XCTAssertEqual(ConsoleHTML.niceAxis(0).top, 1)
        XCTAssertEqual(ConsoleHTML.niceAxis(1234).top, 1400)
        XCTAssertEqual(ConsoleHTML.niceAxis(1234).step, 200)
        XCTAssertEqual(ConsoleHTML.niceAxis(9999).top, 10_000)
        XCTAssertEqual(ConsoleHTML.niceAxis(2_850_000).top, 3_200_000)
        XCTAssertEqual(ConsoleHTML.niceAxis(2_850_000).step, 400_000)
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let high = Int128(Int64.random(in: 1...Int64.max, using: &generator)) >> Int.random(in: 0...62, using: &generator)
            let (top, step) = ConsoleHTML.niceAxis(max(high, 1))
            XCTAssertGreaterThanOrEqual(top, high)
            XCTAssertEqual(top % step, 0)
            XCTAssertLessThanOrEqual(top / step, 10, "\(high)")
        }
        XCTAssertEqual(ConsoleHTML.niceAxis(Int128.max).top, Int128.max)
        // A chart of extreme bars renders.
        XCTAssertTrue(ConsoleHTML.barChart(title: "t", summary: "s", bars: [("a", Int128.max), ("b", 0), ("c", -5)]).contains("<svg"))
        XCTAssertTrue(ConsoleHTML.barChart(title: "t", summary: "s", bars: []).contains("</svg>"))
    }

    func testTextIsEscapedEverywhere() {
        let hostile = #"<script>alert("x")</script>&'"#
        XCTAssertEqual(ConsoleHTML.escape(hostile), "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;")
        let chart = ConsoleHTML.barChart(title: hostile, summary: hostile, bars: [(hostile, 1)])
        XCTAssertFalse(chart.contains("<script>"))
        XCTAssertFalse(ConsoleHTML.table(caption: hostile, headers: [hostile], rows: []).contains("<script>"))
        XCTAssertFalse(ConsoleHTML.figure(hostile, shown: hostile, exact: hostile).contains("<script>"))
        XCTAssertFalse(ConsoleHTML.page(title: hostile, navigation: [(hostile, hostile)], current: "", body: "").contains("<script>"))
    }
}
