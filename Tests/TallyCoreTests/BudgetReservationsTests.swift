import TallyCore
import XCTest

final class BudgetReservationsTests: XCTestCase {
    let team = BudgetKey(customerID: "acme", name: "team")
    let soft = BudgetKey(customerID: "acme", name: "soft")
    let day = BillingPeriod(start: 0, end: 86_400_000_000)

    func snapshot(used: Int64 = 0, limit: Int64 = 500, softUsed: Int64 = 0, offsets: [Int32: Int64] = [:]) -> BudgetSnapshot {
        BudgetSnapshot(budgets: [
            (team, BudgetDefinition(name: "team", period: .day, measure: .tokens, limit: limit), day, "", used),
            (soft, BudgetDefinition(name: "soft", period: .day, measure: .tokens, limit: 100, enforced: false), day, "", softUsed),
        ], raterNextOffsets: offsets)
    }

    /// 50 calls at once, each estimated at 43 tokens, against 500: admitted while something is
    /// left, so 12 (43 × 11 = 473 < 500 ≤ 43 × 12 = 516), and the rest refused naming the budget.
    func testABurstPassesTheLimitByLessThanOneEstimate() {
        var reservations = BudgetReservations()
        var admitted: [Int] = []
        var refused = 0
        for _ in 0..<50 {
            switch reservations.admit(snapshot(), estimates: [team: 43], now: 0) {
            case .admitted(let id, _): admitted.append(id)
            case .refused(let budget, _):
                XCTAssertEqual(budget.key, team)
                XCTAssertEqual(budget.held, 516)
                refused += 1
            }
        }
        XCTAssertEqual(admitted.count, 12)
        XCTAssertEqual(refused, 38)
        // Each used 41 (less than its estimate): 492 held, so one more fits, and then no more.
        for id in admitted { reservations.settle(id, actual: [team: 41]) }
        guard case .admitted(let extra, _) = reservations.admit(snapshot(), estimates: [team: 43], now: 0) else { return XCTFail("8 tokens are left") }
        reservations.settle(extra, actual: [team: 41])
        guard case .refused(let budget, _) = reservations.admit(snapshot(), estimates: [team: 43], now: 0) else { return XCTFail("533 held") }
        XCTAssertEqual(budget.remaining, 500 - 13 * 41)
        XCTAssertLessThan(13 * 41 - 500, 43, "past the limit by less than one estimate")
    }

    /// A hold ends once the rater's offsets pass its event: its usage is in the snapshot then.
    func testAHoldLastsUntilTheRaterHasCountedItsEvent() {
        var reservations = BudgetReservations()
        guard case .admitted(let id, _) = reservations.admit(snapshot(), estimates: [team: 400], now: 0) else { return XCTFail() }
        reservations.settle(id, actual: [team: 300])
        reservations.published(id, at: LogPosition(partition: 2, offset: 7))
        XCTAssertEqual(reservations.availability(snapshot(offsets: [2: 7]), now: 0).first { $0.key == team }?.held, 300)
        XCTAssertEqual(reservations.availability(snapshot(used: 300, offsets: [2: 8]), now: 0).first { $0.key == team }?.held, 0)
        XCTAssertTrue(reservations.holds.isEmpty)
    }

    /// Soft budgets are reported and never refuse or hold; budgets a call is not under are not its business.
    func testSoftBudgetsNeverRefuse() {
        var reservations = BudgetReservations()
        guard case .admitted(let id, let budgets) = reservations.admit(snapshot(softUsed: 1_000), estimates: [soft: 50], now: 0) else { return XCTFail() }
        XCTAssertEqual(budgets.map(\.key), [soft])
        XCTAssertEqual(reservations.holds[id]?.amounts, [:])
        guard case .admitted = reservations.admit(snapshot(used: 10_000), estimates: [soft: 50], now: 0) else { return XCTFail("not under team") }
    }

    /// A `/v1/check` hold lapses unless its event comes; the event's customer and id find it, and
    /// a second check for the same event replaces the first hold.
    func testCheckHoldsAreFoundByTheirEventAndLapse() {
        var reservations = BudgetReservations()
        guard case .admitted(let first, _) = reservations.admit(snapshot(), estimates: [team: 200], now: 0, eventID: ("acme", "e-1"), expiresAt: 1_000)
        else { return XCTFail() }
        guard case .admitted(let second, _) = reservations.admit(snapshot(), estimates: [team: 250], now: 0, eventID: ("acme", "e-1"), expiresAt: 1_000)
        else { return XCTFail() }
        XCTAssertNil(reservations.holds[first])
        XCTAssertEqual(reservations.hold(forEvent: ("acme", "e-1")), second)
        XCTAssertNil(reservations.hold(forEvent: ("other", "e-1")))
        XCTAssertTrue(reservations.holdsEvents)
        XCTAssertEqual(reservations.availability(snapshot(), now: 999).first { $0.key == team }?.held, 250)
        XCTAssertEqual(reservations.availability(snapshot(), now: 1_000).first { $0.key == team }?.held, 0, "lapsed")
        XCTAssertFalse(reservations.holdsEvents)
        // Settled by its event: it no longer lapses, and a resent copy finds nothing to settle.
        guard case .admitted(let third, _) = reservations.admit(snapshot(), estimates: [team: 100], now: 0, eventID: ("acme", "e-2"), expiresAt: 10)
        else { return XCTFail() }
        reservations.settle(third, actual: [team: 60])
        reservations.published(third, at: LogPosition(partition: 0, offset: 3))
        XCTAssertNil(reservations.hold(forEvent: ("acme", "e-2")))
        XCTAssertEqual(reservations.availability(snapshot(), now: 1_000_000).first { $0.key == team }?.held, 60)
    }

    /// Limits and holds near Int64.max saturate instead of trapping.
    func testExtremeAmountsSaturate() {
        var reservations = BudgetReservations()
        for _ in 0..<3 { _ = reservations.admit(snapshot(limit: Int64.max), estimates: [team: Int64.max], now: 0) }
        let standing = reservations.availability(snapshot(used: Int64.max, limit: Int64.max), now: 0).first { $0.key == team }!
        XCTAssertEqual(standing.held, Int64.max)
        XCTAssertLessThanOrEqual(standing.remaining, 0)
        guard case .refused = reservations.admit(snapshot(limit: Int64.max), estimates: [team: 1], now: 0) else { return XCTFail() }
    }

    /// A hold is at most the budget's limit; what is left never traps, even at Int64.min used.
    func testHoldsAreCappedAtTheLimit() {
        var reservations = BudgetReservations()
        guard case .admitted(let id, _) = reservations.admit(snapshot(), estimates: [team: 1_000_000], now: 0) else { return XCTFail() }
        XCTAssertEqual(reservations.holds[id]?.amounts[team], 500)
        let standing = reservations.availability(snapshot(used: Int64.min), now: 0).first { $0.key == team }!
        XCTAssertEqual(standing.remaining, Int64.max)
    }
}

