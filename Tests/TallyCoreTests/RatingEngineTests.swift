import TallyCore
import XCTest

final class RatingEngineTests: XCTestCase {
    static let usd = Currency("USD")!

    static func rate(_ text: String) -> TokenRate { TokenRate.parse(text, perTokens: .perMillion)! }

    static let catalog = PriceCatalog(books: [PriceBook(name: "default", version: 1, effectiveFrom: EventTime("2026-01-01T00:00:00Z")!, currency: usd, models: [
        ModelPrices(model: "cheap", prices: [.input: .perUnit(rate("0.0375")), .output: .perUnit(rate("0.15"))]),
        ModelPrices(model: "tiered", prices: [
            .input: .graduated([PriceTier(upTo: 10_000, rate: rate("3")), PriceTier(upTo: nil, rate: rate("1.7"))]),
            .output: .package(size: 1_000, priceNanos: Money.nanos("0.013")!),
            .reasoning: .volume([PriceTier(upTo: 5_000, rate: rate("9")), PriceTier(upTo: nil, rate: rate("7"))]),
        ]),
    ])])

    func usage(_ id: String, customer: String = "acme", model: String = "cheap", input: Int64, output: Int64 = 0, reasoning: Int64 = 0,
               time: String = "2026-03-10T00:00:00Z", offset: Int64) -> RaterRecord {
        .usage(PositionedEvent(event: UsageEvent(id: id, source: "t", subject: customer, time: EventTime(time)!, model: model,
                                                 inputTokens: input, outputTokens: output, reasoningOutputTokens: reasoning),
                               position: LogPosition(partition: 0, offset: offset)))
    }

    func grant(_ id: String, customer: String = "acme", amount: String, priority: Int64 = 100, expires: String? = nil,
               time: String = "2026-03-01T00:00:00Z", offset: Int64) -> RaterRecord {
        .grant(PositionedGrant(grant: GrantEvent(id: id, source: "t", subject: customer, time: EventTime(time)!, amountNanos: Money.nanos(amount)!,
                                                 currency: Self.usd, priority: priority, expiresAt: expires.map { EventTime($0)! }),
                               position: LogPosition(partition: 0, offset: offset)))
    }

    /// Rates records in the given batches the way the store does: load, apply, keep.
    func rate(_ batches: [[RaterRecord]], profiles: [String: BillingProfile] = [:]) -> (state: RatingState, ledger: [LedgerEntry], alerts: [BalanceAlert], topUps: [TopUpRequest], unpriced: Int) {
        let engine = RatingEngine(catalog: Self.catalog)
        var state = RatingState()
        state.profiles = profiles
        var ledger: [LedgerEntry] = [], alerts: [BalanceAlert] = [], topUps: [TopUpRequest] = [], unpriced = 0
        for batch in batches {
            let result = engine.apply(batch, to: &state)
            ledger += result.ledger
            alerts += result.alerts
            topUps += result.topUps
            unpriced += result.unpriced.count
        }
        return (state, ledger, alerts, topUps, unpriced)
    }

    /// A budget declaration is no wallet record: its time (whoever declared it chose it) expires no grant.
    func testABudgetDeclarationExpiresNoGrant() {
        let declaration = RaterRecord.budget(PositionedBudget(budget: BudgetEvent(
            id: "b1", source: "t", subject: "acme", time: EventTime("2027-01-01T00:00:00Z")!, name: "monthly",
            definition: BudgetDefinition(name: "monthly", period: .month, measure: .tokens, limit: 10)), position: LogPosition(partition: 0, offset: 1)))
        let (state, ledger, _, _, _) = rate([[grant("g1", amount: "5", expires: "2026-06-01T00:00:00Z", offset: 0), declaration]])
        XCTAssertEqual(ledger.map(\.kind), [.grant])
        XCTAssertEqual(state[wallet: WalletKey(customerID: "acme", currency: Self.usd)]?.balanceNanos, Money.nanos("5")!)
    }

    /// Invariant 5: whatever the batch boundaries, the charges add up to the rounded charge of
    /// each period's total quantity, and the ledger is the same entry for entry.
    func testChargesNeverDriftWhateverTheBatchSplit() {
        var generator = SeededGenerator(seed: 42)
        var records: [RaterRecord] = [grant("g0", amount: "0.5", offset: 0)]
        for offset in 1...600 {
            let model = Bool.random(using: &generator) ? "cheap" : "tiered"
            let output = Int64.random(in: 0...900, using: &generator)
            records.append(usage("e\(offset)", model: model, input: Int64.random(in: 0...700, using: &generator), output: output,
                                 reasoning: Int64.random(in: 0...output, using: &generator),
                                 time: offset < 300 ? "2026-03-10T00:00:00Z" : "2026-04-02T00:00:00Z", offset: Int64(offset)))
        }
        let reference = rate([records])
        // The charge of each period's total, computed independently of the engine.
        var totals: [String: Int64] = [:]
        for case .usage(let positioned) in records {
            let event = positioned.event
            let period = BillingPeriod.containing(event.time.microseconds, anchorDay: 1).label
            let prices = Self.catalog.books[0].prices(for: event.model)!
            for (type, quantity) in prices.quantities(event) { totals["\(period)/\(event.model)/\(type)", default: 0] += quantity }
        }
        var expected: Int64 = 0
        for (key, quantity) in totals {
            let parts = key.split(separator: "/")
            let prices = Self.catalog.books[0].prices(for: String(parts[1]))!
            expected += prices.prices[TokenType(rawValue: String(parts[2]))!]!.charge(quantity)!
        }
        let charged = reference.ledger.filter { $0.kind == .usage }.reduce(0) { $0 - $1.amountNanos }
        XCTAssertEqual(charged, expected)
        XCTAssertEqual(reference.state.charges.values.reduce(0) { $0 + $1.amountNanos }, expected)
        XCTAssertEqual(reference.state.wallets[WalletKey(customerID: "acme", currency: Self.usd)]?.balanceNanos,
                       Money.nanos("0.5")! - expected)

        for trial in 0..<25 {
            var splits: [[RaterRecord]] = []
            var rest = records[...]
            while !rest.isEmpty {
                let size = Int.random(in: 1...(trial % 2 == 0 ? 7 : 90), using: &generator)
                splits.append(Array(rest.prefix(size)))
                rest = rest.dropFirst(size)
            }
            let outcome = rate(splits)
            XCTAssertEqual(outcome.ledger, reference.ledger, "trial \(trial)")
            XCTAssertEqual(outcome.state.charges, reference.state.charges, "trial \(trial)")
            XCTAssertEqual(outcome.state.wallets, reference.state.wallets, "trial \(trial)")
        }
    }

    func testGrantsAreDrawnByPriorityThenExpiryAndOverageHasNoGrant() {
        // 1M input tokens of "cheap" cost 0.0375.
        let outcome = rate([[
            grant("late-expiry", amount: "0.01", priority: 5, expires: "2026-12-01T00:00:00Z", offset: 0),
            grant("no-expiry", amount: "0.01", priority: 5, offset: 1),
            grant("early-expiry", amount: "0.01", priority: 5, expires: "2026-06-01T00:00:00Z", offset: 2),
            grant("low-priority", amount: "1.00", priority: 50, offset: 3),
            usage("u1", input: 1_000_000, offset: 4),
            usage("u2", input: 40_000_000, offset: 5),
        ]])
        let debits = outcome.ledger.filter { $0.kind == .usage }
        XCTAssertEqual(debits.map(\.grantID), ["early-expiry", "late-expiry", "no-expiry", "low-priority", "low-priority", nil])
        XCTAssertEqual(debits.map(\.amountNanos), [-10_000_000, -10_000_000, -10_000_000, -7_500_000, -992_500_000, -507_500_000])
        XCTAssertEqual(debits.map(\.eventID), ["u1", "u1", "u1", "u1", "u2", "u2"], "every debit references the usage it charges")
        let wallet = outcome.state.wallets[WalletKey(customerID: "acme", currency: Self.usd)]!
        XCTAssertEqual(wallet.balanceNanos, outcome.ledger.reduce(0) { $0 + $1.amountNanos }, "balance = sum of entries")
        XCTAssertEqual(wallet.balanceNanos, -507_500_000)
    }

    func testExpiredRemainderIsWrittenOffAtTheExpiryTime() {
        let outcome = rate([[
            grant("promo", amount: "1.00", priority: 1, expires: "2026-03-05T00:00:00Z", offset: 0),
            usage("u1", input: 1_000_000, time: "2026-03-02T00:00:00Z", offset: 1),
            usage("u2", input: 1_000_000, time: "2026-03-06T00:00:00Z", offset: 2),
        ]])
        XCTAssertEqual(outcome.ledger.map(\.kind), [.grant, .usage, .expiry, .usage])
        let expiry = outcome.ledger[2]
        XCTAssertEqual(expiry.amountNanos, -962_500_000)
        XCTAssertEqual(expiry.effectiveAt.microseconds, EventTime("2026-03-05T00:00:00Z")!.microseconds)
        XCTAssertNil(outcome.ledger[3].grantID, "after expiry the charge is overage")
    }

    /// A void writes off what is left of its grant and no more: a grant of 1.00, 8M input tokens of
    /// "cheap" (0.0375 per 1M: 0.30) drawn from it, then the void takes the other 0.70; usage after
    /// it (4M tokens, 0.15) is overage. A second void finds nothing left: it changes nothing, and says so.
    func testAVoidWritesOffWhatIsLeftOfItsGrant() {
        func void(_ id: String, grant: String, offset: Int64) -> RaterRecord {
            .grantVoid(PositionedGrantVoid(void: GrantVoidEvent(id: id, source: "t", subject: "acme", time: EventTime("2026-03-12T00:00:00Z")!,
                                                                grantID: grant, reason: "refund"),
                                           position: LogPosition(partition: 0, offset: offset)))
        }
        let engine = RatingEngine(catalog: Self.catalog)
        var state = RatingState()
        let result = engine.apply([grant("g1", amount: "1.00", offset: 0), usage("e1", input: 8_000_000, offset: 1),
                                   void("void-g1", grant: "g1", offset: 2), usage("e2", input: 4_000_000, offset: 3),
                                   void("void-g1-again", grant: "g1", offset: 4)], to: &state)
        let wallet = WalletKey(customerID: "acme", currency: Self.usd)
        XCTAssertEqual(result.ledger.map(\.kind), [.grant, .usage, .void, .usage])
        XCTAssertEqual(result.ledger.map(\.amountNanos), [1_000_000_000, -300_000_000, -700_000_000, -150_000_000])
        XCTAssertEqual(result.ledger[2].grantID, "g1")
        XCTAssertEqual(result.ledger[2].eventID, "void-g1")
        XCTAssertEqual(result.ledger[3].grantID, nil, "nothing left to draw on: overage")
        XCTAssertEqual(state[wallet: wallet]?.balanceNanos, -150_000_000)
        XCTAssertEqual(result.unrateable.map(\.record.position.offset), [4])
        XCTAssertTrue(result.unrateable.first?.reason.contains("grant g1 of customer acme has no credit left to void") ?? false)
    }

    func testOneAlertAndOneTopUpRequestPerCrossing() {
        var profile = BillingProfile(customerID: "acme")
        profile.lowBalanceThresholdsNanos = [Money.nanos("0.5")!, Money.nanos("0.1")!]
        profile.autoTopUp = AutoTopUpRule(belowNanos: Money.nanos("0.5")!, amountNanos: Money.nanos("1")!)
        profile.overage = .stop
        // Each usage costs 0.15 (1M output tokens of "cheap").
        var records: [RaterRecord] = [grant("g1", amount: "1.00", offset: 0)]
        for i in 1...8 { records.append(usage("u\(i)", input: 0, output: 1_000_000, offset: Int64(i))) }
        records.append(grant("topup", amount: "1.00", offset: 9))
        for i in 10...14 { records.append(usage("u\(i)", input: 0, output: 1_000_000, offset: Int64(i))) }
        let outcome = rate([records], profiles: ["acme": profile])
        // 1.00 → 0.85 → 0.70 → 0.55 → 0.40 (crosses 0.5) → 0.25 → 0.10 → -0.05 (crosses 0.1) → -0.20;
        // top-up → 0.80 → 0.65 → 0.50 (u11) → 0.35 (u12 crosses 0.5 again) → 0.20 → 0.05 (crosses 0.1 again).
        XCTAssertEqual(outcome.alerts.map { Money.format(nanos: $0.thresholdNanos) }, ["0.50", "0.10", "0.50", "0.10"])
        XCTAssertEqual(outcome.alerts.map(\.position.offset), [4, 7, 12, 14])
        XCTAssertEqual(outcome.topUps.map(\.position.offset), [4, 12], "one request per crossing, never a loop")
        XCTAssertEqual(Set(outcome.alerts.map(\.alertID)).count, 4)
        let wallet = outcome.state.wallets[WalletKey(customerID: "acme", currency: Self.usd)]!
        XCTAssertFalse(wallet.blocked, "balance is positive again")
        let blockedAtSeven = rate([Array(records.prefix(8))], profiles: ["acme": profile]).state.wallets.first!.value
        XCTAssertTrue(blockedAtSeven.blocked, "stop policy: refused once the balance is zero or below")
    }

    func testUnknownModelsAreKeptNotBilledAtZero() {
        let outcome = rate([[usage("u1", model: "mystery", input: 5, offset: 0), usage("u2", input: 0, output: 0, offset: 1)]])
        XCTAssertEqual(outcome.unpriced, 1)
        XCTAssertTrue(outcome.ledger.isEmpty)
    }

    /// Meters are priced like tokens, per unit of the meter: per unit, package, graduated and
    /// volume over the period's cumulative units; a COUNT meter charges one unit per event;
    /// a meter-only event is charged by its meters; an unpriced model call charges nothing.
    func testMetersArePricedPerUnitOverThePeriod() {
        func unitRate(_ text: String) -> TokenRate { TokenRate.parse(text, perTokens: .perToken)! }
        let book = PriceBook(name: "default", version: 1, effectiveFrom: EventTime("2026-01-01T00:00:00Z")!, currency: Self.usd,
                             models: Self.catalog.books[0].models, meters: [
            MeterPrice(meter: "vector_searches", pricing: .perUnit(unitRate("0.002"))),
            MeterPrice(meter: "web_search_requests", pricing: .package(size: 1_000, priceNanos: Money.nanos("10.00")!)),
            MeterPrice(meter: "images", pricing: .graduated([PriceTier(upTo: 100, rate: unitRate("0.04")), PriceTier(upTo: nil, rate: unitRate("0.02"))])),
            MeterPrice(meter: "calls", pricing: .volume([PriceTier(upTo: 2, rate: unitRate("1.00")), PriceTier(upTo: nil, rate: unitRate("0.50"))])),
        ])
        let meterCatalog = MeterCatalog([MeterDefinition(name: "calls", unit: "call", aggregation: .count),
                                         MeterDefinition(name: "images", unit: "image", aggregation: .sum)])
        let engine = RatingEngine(catalog: PriceCatalog(books: [book]), meters: meterCatalog)
        func event(_ id: String, model: String = "", input: Int64 = 0, meters: [String: Int64], offset: Int64) -> RaterRecord {
            .usage(PositionedEvent(event: UsageEvent(id: id, source: "t", subject: "acme", time: EventTime("2026-03-10T00:00:00Z")!, model: model,
                                                     inputTokens: input, outputTokens: 0, meters: meters),
                                   position: LogPosition(partition: 0, offset: offset)))
        }
        var state = RatingState()
        let records = [
            event("v1", meters: ["vector_searches": 3], offset: 0),
            event("w1", model: "cheap", input: 1_000_000, meters: ["web_search_requests": 1_500, "calls": 5], offset: 1),
            event("i1", meters: ["images": 150, "calls": 9, "unpriced_meter": 4], offset: 2),
            event("x1", model: "mystery", input: 10, meters: ["vector_searches": 1_000], offset: 3),
        ]
        // Any batching: the same totals.
        for record in records { _ = engine.apply([record], to: &state) }
        var together = RatingState()
        let result = engine.apply(records, to: &together)
        XCTAssertEqual(result.unpriced.map(\.event.id), ["x1"], "the unpriced model call is kept whole, its meters too")
        XCTAssertEqual(state.charges, together.charges)
        func charged(_ meter: String) -> ChargeTotal? {
            state.charges[ChargeKey(customerID: "acme", periodStart: EventTime("2026-03-01T00:00:00Z")!.microseconds,
                                    item: PriceItem(bookName: "default", bookCustomer: "", bookVersion: 1, model: meter, tokenType: .meter))]
        }
        // 3 × 0.002; 1,500 searches are 2 started blocks of 1,000 at 10.00; 100 × 0.04 + 50 × 0.02;
        // a count meter: 2 events, 2 units, in the first volume tier at 1.00.
        XCTAssertEqual(charged("vector_searches").map { [$0.quantity, $0.amountNanos] }, [3, 6_000_000])
        XCTAssertEqual(charged("web_search_requests").map { [$0.quantity, $0.amountNanos] }, [1_500, 20_000_000_000])
        XCTAssertEqual(charged("images").map { [$0.quantity, $0.amountNanos] }, [150, 5_000_000_000])
        XCTAssertEqual(charged("calls").map { [$0.quantity, $0.amountNanos] }, [2, 2_000_000_000])
        XCTAssertNil(charged("unpriced_meter"))
        XCTAssertEqual(state.charges.count, 4 + 1, "the four meters and the model call's input")

        // A meter priced in another currency than the event's tokens: the event is kept aside whole.
        let euros = PriceBook(name: "default", customerID: "acme", version: 1, effectiveFrom: EventTime("2026-02-01T00:00:00Z")!, currency: Currency("EUR")!,
                              models: [], meters: [MeterPrice(meter: "vector_searches", pricing: .perUnit(unitRate("0.001")))])
        var mixed = RatingState()
        let refused = RatingEngine(catalog: PriceCatalog(books: [book, euros]), meters: meterCatalog)
            .apply([event("m1", model: "cheap", input: 10, meters: ["vector_searches": 1], offset: 0)], to: &mixed)
        XCTAssertEqual(refused.unrateable.map(\.reason), ["meter vector_searches is priced in EUR (book default v1), the event's other charges in USD: one event is charged in one currency"])
        XCTAssertTrue(mixed.charges.isEmpty)
    }

    func testOverageLimitBlocksBelowTheLimit() {
        XCTAssertFalse(OveragePolicy.allow(limitNanos: 100).blocks(balanceNanos: -100))
        XCTAssertTrue(OveragePolicy.allow(limitNanos: 100).blocks(balanceNanos: -101))
        XCTAssertFalse(OveragePolicy.allow(limitNanos: nil).blocks(balanceNanos: Int64.min / 2))
        XCTAssertTrue(OveragePolicy.stop.blocks(balanceNanos: 0))
    }

    func testGrantEventsDecodeAndValidate() throws {
        let text = #"{"specversion":"1.0","id":"g-1","source":"billing","type":"tally.wallet.grant","subject":"acme","time":"2026-03-01T00:00:00Z","data":{"amount":"25.50","currency":"USD","priority":10,"expires_at":"2027-03-01T00:00:00Z","source":"promotion"}}"#
        guard case .grant(let grant) = try EventDecoder.decode(text).get() else { return XCTFail("not a grant") }
        XCTAssertEqual(grant.amountNanos, 25_500_000_000)
        XCTAssertEqual(grant.grantSource, .promotion)
        XCTAssertEqual(grant.priority, 10)
        guard case .grant(let again) = try EventDecoder.decode(EventEncoder.encode(grant)).get() else { return XCTFail() }
        XCTAssertEqual(again, grant)
        for (replacement, path) in [("\"25.50\"", "data.amount"), ("\"-1\"", "data.amount"), ("25.5", "data.amount")] {
            let bad = text.replacingOccurrences(of: "\"25.50\"", with: replacement == "\"25.50\"" ? "\"0\"" : replacement)
            guard case .failure(let error) = EventDecoder.decode(bad) else { return XCTFail(bad) }
            XCTAssertTrue(error.violations.contains { $0.path == path }, "\(error)")
        }
        let expiredAlready = text.replacingOccurrences(of: "2027-03-01", with: "2026-02-01")
        guard case .failure(let error) = EventDecoder.decode(expiredAlready) else { return XCTFail() }
        XCTAssertEqual(error.violations.map(\.path), ["data.expires_at"])
        let noCurrency = text.replacingOccurrences(of: #""currency":"USD","#, with: "")
        guard case .failure(let missing) = EventDecoder.decode(noCurrency) else { return XCTFail() }
        XCTAssertEqual(missing.violations.map(\.path), ["data.currency"])
    }
}

final class InvoiceBuilderTests: XCTestCase {
    let usd = Currency("USD")!
    let november = BillingPeriod.parse("2026-11", anchorDay: 1)!
    let october = BillingPeriod.parse("2026-10", anchorDay: 1)!

    func item(_ model: String, _ type: TokenType) -> PriceItem {
        PriceItem(bookName: "default", bookCustomer: "", bookVersion: 1, model: model, tokenType: type)
    }

    func testLinesMinimumFeeAndCreditsRoundPerLine() throws {
        var inputs = InvoiceInputs(customerID: "acme", period: november, currency: usd)
        inputs.subscriptionFeeNanos = 20_000_000_000
        inputs.minimumNanos = 5_000_000_000
        inputs.charges = [
            RatedCharge(periodStart: november.start, item: item("gpt-4o", .input), quantity: 1_000_001, amountNanos: 2_500_002_500, pricing: "2.50"),
            RatedCharge(periodStart: november.start, item: item("gpt-4o", .output), quantity: 100_001, amountNanos: 1_000_010_000, pricing: "10.00"),
        ]
        inputs.creditsDrawn = [november.start: 1_234_567_891]
        let invoice = try InvoiceBuilder.build(inputs)
        XCTAssertEqual(invoice.lines.map(\.kind), [.usage, .usage, .subscription, .minimum, .credits])
        XCTAssertEqual(invoice.lines.map(\.amountNanos), [2_500_000_000, 1_000_000_000, 20_000_000_000, 1_500_000_000, -1_230_000_000])
        // 2.50 + 1.00 + 20.00 + (5.00 - 3.5000125 = 1.4999875 → 1.50) - 1.23
        XCTAssertEqual(usd.format(invoice.totalDueNanos), "23.77")
        XCTAssertEqual(invoice.invoiceID, "INV-2026-11-acme-USD")
        XCTAssertTrue(InvoiceBuilder.json(invoice).contains(#""total_due":"23.77""#))
    }

    func testLateUsageForAClosedPeriodBecomesAnAdjustment() throws {
        var inputs = InvoiceInputs(customerID: "acme", period: november, currency: usd)
        inputs.charges = [
            RatedCharge(periodStart: october.start, item: item("gpt-4o", .input), quantity: 3_000_000, amountNanos: 7_500_000_000, pricing: "2.50"),
            RatedCharge(periodStart: october.start, item: item("gpt-4o", .output), quantity: 10, amountNanos: 100_000, pricing: "10.00"),
        ]
        // October was invoiced with 2M input tokens; the output line did not exist yet.
        inputs.invoiced = [InvoicedCharge(periodStart: october.start, item: item("gpt-4o", .input), quantity: 2_000_000, exactNanos: 5_000_000_000)]
        inputs.creditsDrawn = [october.start: 6_000_000_000]
        inputs.creditsInvoiced = [october.start: 5_000_000_000]
        let invoice = try InvoiceBuilder.build(inputs)
        XCTAssertEqual(invoice.lines.map(\.kind), [.adjustment, .adjustment, .credits])
        XCTAssertEqual(invoice.lines[0].quantity, 1_000_000)
        XCTAssertEqual(invoice.lines[0].amountNanos, 2_500_000_000)
        XCTAssertEqual(invoice.lines[0].description, "Late usage for 2026-10: gpt-4o input tokens")
        XCTAssertEqual(invoice.lines[1].amountNanos, 0, "0.0001 rounds to 0.00 on the line; its exact amount is kept")
        XCTAssertEqual(invoice.lines[1].exactNanos, 100_000)
        XCTAssertEqual(invoice.lines[2].amountNanos, -1_000_000_000)
        XCTAssertEqual(usd.format(invoice.totalDueNanos), "1.50")
    }

    /// Usage paid in full by credit nets to zero on the invoice, whatever the per-line rounding.
    func testCreditCoveringAllUsageCancelsTheRoundedLines() throws {
        var inputs = InvoiceInputs(customerID: "acme", period: november, currency: usd)
        inputs.subscriptionFeeNanos = 49_000_000_000
        // Two lines of x.xx4 each: rounded down on each line they would show 3.00 for 3.008; the
        // lines add up to the exact sum rounded once (3.01), the later line taking the cent.
        inputs.charges = [
            RatedCharge(periodStart: november.start, item: item("gpt-4o", .input), quantity: 1, amountNanos: 1_004_000_000, pricing: "p"),
            RatedCharge(periodStart: november.start, item: item("gpt-4o", .output), quantity: 1, amountNanos: 2_004_000_000, pricing: "p"),
        ]
        inputs.creditsDrawn = [november.start: 3_008_000_000]
        var invoice = try InvoiceBuilder.build(inputs)
        XCTAssertEqual(invoice.lines.filter { $0.kind == .usage }.map(\.amountNanos), [1_000_000_000, 2_010_000_000])
        XCTAssertEqual(invoice.lines.last?.amountNanos, -3_010_000_000, "credit equals the usage shown: 3.008 rounded once")
        XCTAssertEqual(usd.format(invoice.totalDueNanos), "49.00")
        XCTAssertEqual(invoice.lines.last?.exactNanos, -3_008_000_000, "the exact credit is kept for later invoices")
        // Two lines of x.xx6: rounded up on each line; full coverage still nets to zero.
        inputs.charges = inputs.charges.map { RatedCharge(periodStart: $0.periodStart, item: $0.item, quantity: 1, amountNanos: $0.amountNanos + 2_000_000, pricing: "p") }
        inputs.creditsDrawn = [november.start: 3_012_000_000]
        invoice = try InvoiceBuilder.build(inputs)
        XCTAssertEqual(usd.format(invoice.totalDueNanos), "49.00")
        // Partly covered: the credit is its own rounded amount.
        inputs.creditsDrawn = [november.start: 1_234_000_000]
        invoice = try InvoiceBuilder.build(inputs)
        XCTAssertEqual(invoice.lines.last?.amountNanos, -1_230_000_000)
    }

    /// A closed period re-rated at a lower price (replay after a price change, promoted): the next
    /// invoice carries a credit note for it; the closed invoice is not rewritten.
    func testRepricingAClosedPeriodGivesACreditNote() throws {
        var inputs = InvoiceInputs(customerID: "acme", period: november, currency: usd)
        inputs.charges = [RatedCharge(periodStart: october.start, item: item("gpt-4o", .output), quantity: 1_000_000, amountNanos: 8_000_000_000, pricing: "8.00")]
        inputs.invoiced = [InvoicedCharge(periodStart: october.start, item: item("gpt-4o", .output), quantity: 1_000_000, exactNanos: 10_000_000_000)]
        let invoice = try InvoiceBuilder.build(inputs)
        XCTAssertEqual(invoice.lines.map(\.description), ["Credit note (repricing) for 2026-10: gpt-4o output tokens"])
        XCTAssertEqual(invoice.lines.first?.quantity, 0)
        XCTAssertEqual(usd.format(invoice.totalDueNanos), "-2.00")
    }

    func testNothingToBillGivesNoLines() throws {
        XCTAssertTrue(try InvoiceBuilder.build(InvoiceInputs(customerID: "idle", period: november, currency: usd)).isEmpty)
    }
}

final class UsageReportTests: XCTestCase {
    func testReportRendersChartsAndEscapesText() {
        let period = BillingPeriod.parse("2026-02", anchorDay: 1)!
        let days = UsageReport.days(of: period)
        XCTAssertEqual(days.count, 28)
        XCTAssertEqual(days.first, "2026-02-01")
        let report = UsageReport(customerID: "<acme & co>", period: period, currency: Currency("USD")!, days: days,
                                 tokensByModel: ["gpt-4o": Array(repeating: 10, count: 28), "o3-mini": Array(repeating: 5, count: 28)],
                                 spendNanos: Array(repeating: 250_000_000, count: 28), balanceNanos: (0..<28).map { 10_000_000_000 - Int128($0) * 250_000_000 },
                                 eventCount: 56)
        let html = UsageReportRenderer.html(report)
        XCTAssertTrue(html.contains("Usage of &lt;acme &amp; co&gt;"))
        XCTAssertFalse(html.contains("<acme"))
        XCTAssertTrue(html.contains(#"id="total-tokens">420<"#))
        XCTAssertTrue(html.contains(#"id="total-spend">7.00 USD<"#))
        XCTAssertTrue(html.contains(#"id="closing-balance">3.25 USD<"#))
        XCTAssertEqual(html.components(separatedBy: "<polyline").count - 1, 3, "two models and the balance")
        XCTAssertEqual(html.components(separatedBy: "<rect").count - 1, 28, "a bar per day")
    }
}
