import TallyCore
import XCTest

final class BudgetEngineTests: XCTestCase {
    static let usd = Currency("USD")!

    func usage(_ offset: Int64, customer: String = "acme", input: Int64, output: Int64 = 0, time: String = "2026-03-10T12:00:00Z",
               properties: [String: String] = [:], meters: [String: Int64] = [:], model: String = "gpt-4o") -> RaterRecord {
        .usage(PositionedEvent(event: UsageEvent(id: "e\(offset)", source: "t", subject: customer, time: EventTime(time)!, model: model,
                                                 inputTokens: input, outputTokens: output, properties: properties, meters: meters),
                               position: LogPosition(partition: 0, offset: offset)))
    }

    func budget(_ offset: Int64, customer: String = "acme", _ definition: BudgetDefinition?, name: String? = nil) -> RaterRecord {
        .budget(PositionedBudget(budget: BudgetEvent(id: "b\(offset)", source: "t", subject: customer, time: EventTime("2026-03-01T00:00:00Z")!,
                                                     name: name ?? definition!.name, definition: definition),
                                 position: LogPosition(partition: 0, offset: offset)))
    }

    /// `records` cut into consecutive batches of 1 to `atMost` records, at random.
    static func cut(_ records: [RaterRecord], atMost: Int, using generator: inout SeededGenerator) -> [[RaterRecord]] {
        var batches: [[RaterRecord]] = []
        var rest = records[...]
        while !rest.isEmpty {
            let size = Int.random(in: 1...atMost, using: &generator)
            batches.append(Array(rest.prefix(size)))
            rest = rest.dropFirst(size)
        }
        return batches
    }

    /// Applies `batches` one after another, as the rater does, keeping the state between them.
    func apply(_ batches: [[RaterRecord]], charges: [LogPosition: (currency: Currency, nanos: Int64)] = [:],
               profiles: [String: BillingProfile] = [:]) -> (state: BudgetState, alerts: [BudgetAlert]) {
        var state = BudgetState()
        var alerts: [BudgetAlert] = []
        for batch in batches {
            alerts += BudgetEngine.apply(batch, charges: charges, skipped: [], profiles: profiles, to: &state).alerts
        }
        return (state, alerts)
    }

    func used(_ state: BudgetState, _ name: String, customer: String = "acme", periodStart: String) -> Int64? {
        state.usage.first { $0.key.budget == BudgetKey(customerID: customer, name: name) && $0.key.period.start == EventTime(periodStart)!.microseconds }?.value
    }

    /// 1,000-token limit, alerts at 50 and 80 %: usage before the declaration does not count;
    /// each percentage alerts once, at the event that crosses it, and the limit alerts at 100 %.
    func testAlertsOncePerCrossingAtTheEventThatCrossesIt() {
        let definition = BudgetDefinition(name: "monthly", period: .month, measure: .tokens, limit: 1_000, alertAt: [50, 80])
        let records = [usage(0, input: 900), budget(1, definition)] + (2...13).map { usage(Int64($0), input: 80, output: 20) }
        let (state, alerts) = apply([records])
        // 12 events of 100 tokens after the declaration: 1,200 (the 900 before it are not counted).
        XCTAssertEqual(used(state, "monthly", periodStart: "2026-03-01T00:00:00Z"), 1_200)
        // 500 is reached by the 5th event (offset 6), 800 by the 8th (offset 9), 1,000 by the 10th (offset 11).
        XCTAssertEqual(alerts.map(\.percent), [50, 80, 100])
        XCTAssertEqual(alerts.map(\.position.offset), [6, 9, 11])
        XCTAssertEqual(alerts.map(\.used), [500, 800, 1_000])
        XCTAssertEqual(alerts.map(\.kind), [.threshold, .threshold, .limitReached])
        XCTAssertEqual(Set(alerts.map(\.alertID)).count, 3)
    }

    /// Any cut of the log into batches gives the same usage and the same alerts.
    func testSameUsageAndAlertsWhateverTheBatchSplit() {
        var generator = SeededGenerator(seed: 7)
        let team = BudgetDefinition(name: "team", period: .day, measure: .tokens, limit: 50_000, alertAt: [25, 50, 75], dimensions: ["team": "search"])
        let user = BudgetDefinition(name: "user", period: .week, measure: .meter("web_search_requests"), limit: 40, alertAt: [10, 90], enforced: false,
                                    dimensions: ["end_user": "u1"])
        var records = [budget(0, team), budget(1, user)]
        for offset in 2..<400 {
            let day = 1 + offset % 9
            records.append(usage(Int64(offset), input: Int64.random(in: 0...900, using: &generator), output: Int64.random(in: 0...300, using: &generator),
                                 time: "2026-03-0\(day)T1\(offset % 10):00:00Z",
                                 properties: ["team": Bool.random(using: &generator) ? "search" : "ads", "end_user": ["u1", "u2"][offset % 2]],
                                 meters: ["web_search_requests": Int64.random(in: 0...3, using: &generator)]))
            if offset == 200 {
                // Raised limit mid-stream: usage kept, new alerts of the new limit.
                var raised = team
                raised.limit = 80_000
                records.append(budget(1_000, raised))
            }
        }
        let reference = apply([records])
        XCTAssertFalse(reference.alerts.isEmpty)
        for _ in 0..<20 {
            let batches = Self.cut(records, atMost: 60, using: &generator)
            let split = apply(batches)
            XCTAssertEqual(split.state.usage.filter { $0.value != 0 }, reference.state.usage.filter { $0.value != 0 })
            XCTAssertEqual(split.alerts, reference.alerts)
        }
    }

    /// Dimension values pick the usage; a budget of another customer is not touched.
    func testDimensionsPickTheUsageCounted() {
        let team = BudgetDefinition(name: "search-team", period: .month, measure: .tokens, limit: 1_000_000, dimensions: ["team": "search"])
        let user = BudgetDefinition(name: "u1-gpt", period: .month, measure: .tokens, limit: 1_000_000, dimensions: ["end_user": "u1", "model": "gpt-4o"])
        let (state, _) = apply([[
            budget(0, team), budget(1, user), budget(2, customer: "other", team),
            usage(3, input: 10, properties: ["team": "search", "end_user": "u1"]),
            usage(4, input: 100, properties: ["team": "ads", "end_user": "u1"]),
            usage(5, input: 1_000, properties: ["team": "search", "end_user": "u2"]),
            usage(6, input: 10_000, properties: ["team": "search", "end_user": "u1"], model: "claude"),
            usage(7, input: 100_000),
        ]])
        XCTAssertEqual(used(state, "search-team", periodStart: "2026-03-01T00:00:00Z"), 11_010)
        XCTAssertEqual(used(state, "u1-gpt", periodStart: "2026-03-01T00:00:00Z"), 110)
        XCTAssertNil(used(state, "search-team", customer: "other", periodStart: "2026-03-01T00:00:00Z"))
    }

    /// Periods in UTC: days, ISO weeks from Monday, calendar months, billing periods from the anchor day.
    func testPeriodsFollowTheEventTime() {
        var profile = BillingProfile(customerID: "acme")
        profile.anchorDay = 15
        let at = EventTime("2026-03-11T23:59:59.999999Z")!.microseconds  // a Wednesday
        XCTAssertEqual(BudgetPeriod.day.containing(at, profile: profile),
                       BillingPeriod(start: EventTime("2026-03-11T00:00:00Z")!.microseconds, end: EventTime("2026-03-12T00:00:00Z")!.microseconds))
        XCTAssertEqual(BudgetPeriod.week.containing(at, profile: profile),
                       BillingPeriod(start: EventTime("2026-03-09T00:00:00Z")!.microseconds, end: EventTime("2026-03-16T00:00:00Z")!.microseconds))
        XCTAssertEqual(BudgetPeriod.month.containing(at, profile: profile),
                       BillingPeriod(start: EventTime("2026-03-01T00:00:00Z")!.microseconds, end: EventTime("2026-04-01T00:00:00Z")!.microseconds))
        XCTAssertEqual(BudgetPeriod.billingPeriod.containing(at, profile: profile),
                       BillingPeriod(start: EventTime("2026-02-15T00:00:00Z")!.microseconds, end: EventTime("2026-03-15T00:00:00Z")!.microseconds))
        // A Monday at midnight starts its own week; a Sunday's last microsecond is in the week before.
        let monday = EventTime("2026-03-16T00:00:00Z")!.microseconds
        XCTAssertEqual(BudgetPeriod.week.containing(monday, profile: profile).start, monday)
        XCTAssertEqual(BudgetPeriod.week.containing(monday - 1, profile: profile).start, EventTime("2026-03-09T00:00:00Z")!.microseconds)
        // Before 1970 too (negative microseconds): 1969-12-29 was a Monday.
        XCTAssertEqual(BudgetPeriod.week.containing(-1, profile: profile).start, EventTime("1969-12-29T00:00:00Z")!.microseconds)
        XCTAssertEqual(BudgetPeriod.day.containing(-1, profile: profile).start, EventTime("1969-12-31T00:00:00Z")!.microseconds)
    }

    /// A new limit keeps the usage and may alert again; a new scope or a removal starts over.
    func testChangesKeepOrClearTheUsage() {
        let base = BudgetDefinition(name: "b", period: .month, measure: .tokens, limit: 100, alertAt: [50])
        var raised = base
        raised.limit = 200
        var rescoped = raised
        rescoped.dimensions = ["team": "x"]
        let (state, alerts) = apply([[
            budget(0, base), usage(1, input: 60),                    // 60: 50 % of 100
            budget(2, raised), usage(3, input: 50),                  // 110: 50 % of 200 (the new limit's own alert)
            budget(4, raised), usage(5, input: 1),                   // the same declaration again: nothing new
            budget(6, rescoped), usage(7, input: 5, properties: ["team": "x"]),  // starts over: 5
        ], [budget(8, nil, name: "b"), usage(9, input: 1_000)]])     // removed: nothing counted
        XCTAssertEqual(alerts.map { "\($0.percent)@\($0.position.offset)/\($0.declaredAt.offset)" }, ["50@1/0", "50@3/2"])
        XCTAssertEqual(state.usage.values.filter { $0 != 0 }, [])
        XCTAssertNil(state.budgets["acme"]?["b"])
        // Before the removal, the rescoped budget had counted 5.
        let (before, _) = apply([[budget(0, base), usage(1, input: 60), budget(6, rescoped), usage(7, input: 5, properties: ["team": "x"])]])
        XCTAssertEqual(before.usage.values.filter { $0 != 0 }, [5])
    }

    /// Money budgets count what the rater charged in their currency; meters their quantity.
    func testMoneyAndMeterMeasures() {
        let money = BudgetDefinition(name: "spend", period: .month, measure: .money(Self.usd), limit: Money.nanos("1.00")!)
        let meter = BudgetDefinition(name: "searches", period: .day, measure: .meter("web_search_requests"), limit: 3)
        let records = [budget(0, money), budget(1, meter), usage(2, input: 1, meters: ["web_search_requests": 2]), usage(3, input: 1),
                       usage(4, input: 1, meters: ["web_search_requests": 1])]
        let charges: [LogPosition: (currency: Currency, nanos: Int64)] = [
            LogPosition(partition: 0, offset: 2): (Self.usd, Money.nanos("0.60")!),
            LogPosition(partition: 0, offset: 3): (Currency("EUR")!, Money.nanos("5.00")!),  // another currency: not counted
            LogPosition(partition: 0, offset: 4): (Self.usd, Money.nanos("0.40")!),
        ]
        let (state, alerts) = apply([records], charges: charges)
        XCTAssertEqual(used(state, "spend", periodStart: "2026-03-01T00:00:00Z"), Money.nanos("1.00")!)
        XCTAssertEqual(used(state, "searches", periodStart: "2026-03-10T00:00:00Z"), 3)
        XCTAssertEqual(alerts.map { "\($0.budget.name) \($0.percent)@\($0.position.offset)" }, ["searches 100@4", "spend 100@4"])  // budgets of one event in name order
    }

    /// Extreme quantities saturate instead of trapping; percentages are worked out without overflow.
    func testExtremeQuantitiesDoNotTrap() {
        let huge = BudgetDefinition(name: "max", period: .month, measure: .tokens, limit: EventLimits.maxTokens, alertAt: [1, 1000])
        // Each event adds 2 × (2^53 − 1) tokens: 1 % and 100 % at the first, 1000 % at the fifth,
        // and Int64.max (about 512 events' worth) is where the count stays.
        let records = [budget(0, huge)] + (1...600).map { usage(Int64($0), input: EventLimits.maxTokens, output: EventLimits.maxTokens) }
        let (state, alerts) = apply([records])
        XCTAssertEqual(alerts.map { "\($0.percent)@\($0.position.offset)" }, ["1@1", "100@1", "1000@5"])
        XCTAssertEqual(used(state, "max", periodStart: "2026-03-01T00:00:00Z"), Int64.max)
    }

    /// A budget per value: each run counts apart; the run that passes the limit raises one
    /// runaway alert; usage without a run is under no counter.
    func testABudgetPerRunAlertsOnceForTheRunThatRunsAway() {
        let guardRuns = BudgetDefinition(name: "run-guard", period: .total, measure: .calls, limit: 50, alertAt: [80], enforced: false, per: "run_id")
        var records = [budget(0, guardRuns)]
        var offset: Int64 = 1
        for run in ["r1", "r2", "r3"] {
            for _ in 0..<10 { records.append(usage(offset, input: 5, properties: ["run_id": run])); offset += 1 }
        }
        for _ in 0..<200 { records.append(usage(offset, input: 5, properties: ["run_id": "loop"])); offset += 1 }
        records.append(usage(offset, input: 5))                                                  // no run: not counted
        records.append(usage(offset + 1, input: 0, properties: ["run_id": "r1"], meters: ["x": 1], model: ""))  // no model call
        let (state, alerts) = apply([records])
        // The loop's calls are offsets 31…230: 80 % (40 calls) at its 40th, 100 % at its 50th.
        XCTAssertEqual(alerts.map { "\($0.kind.rawValue) \($0.value) \($0.position.offset)" }, ["budget.threshold loop 70", "usage.runaway loop 80"])
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: state.usage.map { ($0.key.value, $0.value) }), ["r1": 10, "r2": 10, "r3": 10, "loop": 200])
        XCTAssertEqual(BudgetPeriod.total.containing(-5, profile: BillingProfile(customerID: "acme")), BudgetPeriod.total.containing(Int64.max, profile: BillingProfile(customerID: "acme")))
    }

    /// An anomaly watch: 24 steady hours of 1,000 tokens, then an hour of 20 calls of 1,000.
    /// At factor 5 (and a floor of 2,000) the spike hour is anomalous at its 5,000th token, once;
    /// any cut of the log into batches alerts the same.
    func testAnAnomalyWatchAlertsOncePerAnomalousHour() {
        let watch = BudgetDefinition(name: "spikes", period: .hour, measure: .tokens, limit: 2_000, enforced: false,
                                     anomaly: AnomalyRule(factorPercent: 500, baselineHours: 24))
        var records = [budget(0, watch)]
        let start = EventTime("2026-03-09T00:00:00Z")!.microseconds
        var offset: Int64 = 1
        for hour in 0..<24 {
            records.append(usage(offset, input: 1_000, time: EventTime.format(microseconds: start + Int64(hour) * 3_600_000_000 + 60_000_000)))
            offset += 1
        }
        for minute in 0..<20 {
            records.append(usage(offset, input: 1_000, time: EventTime.format(microseconds: start + 24 * 3_600_000_000 + Int64(minute) * 60_000_000)))
            offset += 1
        }
        let (state, alerts) = apply([records])
        // Mean of the 24 hours before: 1,000; 5 × 1,000 = 5,000 is reached by the spike's 5th call (offset 29).
        XCTAssertEqual(alerts.map { "\($0.kind.rawValue) \($0.position.offset) \($0.used) \($0.baseline ?? -1) \($0.percent)" }, ["usage.anomaly 29 5000 1000 500"])
        XCTAssertEqual(used(state, "spikes", periodStart: "2026-03-10T00:00:00Z"), 20_000)
        // The first hour had no baseline: 1,000 is under the floor of 2,000, so it is no anomaly.
        var generator = SeededGenerator(seed: 11)
        for _ in 0..<10 {
            let batches = Self.cut(records, atMost: 7, using: &generator)
            XCTAssertEqual(apply(batches).alerts, alerts)
        }
    }

    /// At most 100 budgets a customer: the 101st declaration changes nothing and says why;
    /// changing one of the 100 still works. A run without a value, or with an empty one, is under no counter.
    func testLimitsOnBudgetsAndValues() {
        var records = (0..<101).map { budget(Int64($0), BudgetDefinition(name: "b\($0)", period: .day, measure: .calls, limit: 5)) }
        records.append(budget(101, BudgetDefinition(name: "b0", period: .day, measure: .calls, limit: 9)))
        var state = BudgetState()
        let result = BudgetEngine.apply(records, charges: [:], skipped: [], profiles: [:], to: &state)
        XCTAssertEqual(state.budgets["acme"]?.count, 100)
        XCTAssertEqual(state.budgets["acme"]?["b0"]?.definition.limit, 9)
        XCTAssertEqual(result.refused.map(\.record.position.offset), [100])
        XCTAssertTrue(result.refused.first?.reason.contains("has 100 budgets already") ?? false)

        let perRun = BudgetDefinition(name: "runs", period: .total, measure: .calls, limit: 1, per: "run_id")
        let long = String(repeating: "ü", count: 1_024)
        let (counted, alerts) = apply([[budget(0, perRun), usage(1, input: 1, properties: ["run_id": ""]), usage(2, input: 1),
                                        usage(3, input: 1, properties: ["run_id": long])]])
        XCTAssertEqual(counted.usage.map(\.key.value), [long])
        // The alert id carries the value's fingerprint, not the value.
        XCTAssertEqual(alerts.count, 1)
        XCTAssertLessThan(alerts[0].alertID.utf8.count, 120)
        XCTAssertFalse(alerts[0].alertID.contains("ü"))
    }
}

