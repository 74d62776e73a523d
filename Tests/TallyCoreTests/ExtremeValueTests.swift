import TallyCore
import XCTest

/// Issue #19: no input the schemas accept traps, alone or summed; what cannot be rated is kept
/// aside with its reason and the others are rated. Right values are worked out here by hand or
/// with `DecimalText`, an independent schoolbook calculation on digit strings.
final class ExtremeValueTests: XCTestCase {
    static let usd = Currency("USD")!
    static let start = EventTime("2026-01-01T00:00:00Z")!
    static let largestTokens: Int64 = 9_007_199_254_740_991  // 2^53 - 1, the schema's maximum

    static func book(_ models: [ModelPrices]) -> PriceCatalog {
        PriceCatalog(books: [PriceBook(name: "default", version: 1, effectiveFrom: start, currency: usd, models: models)])
    }

    static let listPrices = book([
        ModelPrices(model: "gpt-4o", prices: [.input: .perUnit(TokenRate.parse("2.50", perTokens: .perMillion)!),
                                              .output: .perUnit(TokenRate.parse("10.00", perTokens: .perMillion)!)]),
        ModelPrices(model: "luxury", prices: [.input: .perUnit(TokenRate.parse("1000000000", perTokens: .perMillion)!),
                                              .output: .perUnit(TokenRate.parse("1000000000", perTokens: .perMillion)!)]),
    ])

    func usage(_ id: String, customer: String, model: String = "gpt-4o", input: Int64, output: Int64 = 0, offset: Int64) -> RaterRecord {
        .usage(PositionedEvent(event: UsageEvent(id: id, source: "t", subject: customer, time: EventTime("2026-03-10T00:00:00Z")!, model: model,
                                                 inputTokens: input, outputTokens: output),
                               position: LogPosition(partition: 0, offset: offset)))
    }

    func grant(_ id: String, customer: String, amount: String, offset: Int64) -> RaterRecord {
        .grant(PositionedGrant(grant: GrantEvent(id: id, source: "t", subject: customer, time: EventTime("2026-03-01T00:00:00Z")!,
                                                 amountNanos: Money.nanos(amount)!, currency: Self.usd),
                               position: LogPosition(partition: 0, offset: offset)))
    }

    /// The schema's largest input count for gpt-4o costs 22,517,998,136.8524775 USD, past what an
    /// amount holds: that event is kept aside with its exact charge in the reason; the other
    /// customer's event in the same batch is rated.
    func testTheLargestValidEventIsKeptAsideAndOthersAreRated() {
        var state = RatingState()
        let result = RatingEngine(catalog: Self.listPrices).apply([
            usage("huge", customer: "mallory", input: Self.largestTokens, offset: 0),
            usage("normal", customer: "alice", input: 1_000, offset: 1),
        ], to: &state)
        XCTAssertEqual(result.unrateable.map(\.record.key.eventID), ["huge"])
        // 9,007,199,254,740,991 × 2.50 / 10^6 = 225,179,981,368,524,775 / 10^7.
        XCTAssertTrue(result.unrateable[0].reason.contains("22517998136.8524775 USD"), result.unrateable[0].reason)
        XCTAssertEqual(result.ledger.map(\.eventID), ["normal"])
        XCTAssertEqual(result.ledger.map(\.amountNanos), [-2_500_000], "1,000 tokens at 2.50 per 1M")
        XCTAssertFalse(state.charges.keys.contains { $0.customerID == "mallory" }, "the kept-aside event changed nothing")
    }

    /// Ten grants of the largest amount a grant may carry: nine fit a balance, the tenth would not.
    func testGrantsPastTheLargestBalanceAreKeptAside() {
        var state = RatingState()
        let grants = (0..<10).map { grant("g\($0)", customer: "acme", amount: "999999999.999999999", offset: Int64($0)) }
        let result = RatingEngine(catalog: Self.listPrices).apply(grants, to: &state)
        XCTAssertEqual(result.unrateable.map(\.record.key.eventID), ["g9"])
        XCTAssertEqual(result.grantsCredited, 9)
        let wallet = state[wallet: WalletKey(customerID: "acme", currency: Self.usd)]!
        XCTAssertEqual(wallet.balanceNanos, 8_999_999_999_999_999_991, "9 × 999,999,999.999999999")
        XCTAssertEqual(wallet.balanceNanos, result.ledger.reduce(0) { $0 + $1.amountNanos }, "balance = sum of entries")
    }

    /// Five events of 10^15 input tokens at 2.50 per 1M: 2.5 billion USD each. Three fit a period's
    /// charge (7.5 billion); the fourth and fifth would pass 9,223,372,036.85 and are kept aside.
    func testCumulativeChargesPastTheLimitKeepTheLaterEventsAside() {
        var state = RatingState()
        let events = (0..<5).map { usage("e\($0)", customer: "acme", input: 1_000_000_000_000_000, offset: Int64($0)) }
        let result = RatingEngine(catalog: Self.listPrices).apply(events, to: &state)
        XCTAssertEqual(result.unrateable.map(\.record.key.eventID), ["e3", "e4"])
        XCTAssertEqual(state.charges.values.map(\.quantity), [3_000_000_000_000_000])
        XCTAssertEqual(state.charges.values.map(\.amountNanos), [7_500_000_000_000_000_000])
        // The same records cut into batches of one decide the same.
        var oneByOne = RatingState()
        var kept: [String] = []
        for event in events { kept += RatingEngine(catalog: Self.listPrices).apply([event], to: &oneByOne).unrateable.map(\.record.key.eventID) }
        XCTAssertEqual(kept, ["e3", "e4"])
        XCTAssertEqual(oneByOne.charges, state.charges)
    }

    /// A price of 1,000,000,000 per 1M tokens and a 10M-token event: 10^10, past the limit.
    func testAHugePriceTimesAnOrdinaryEventIsKeptAside() {
        let pricing = PricingModel.perUnit(TokenRate.parse("1000000000", perTokens: .perMillion)!)
        XCTAssertNil(pricing.charge(10_000_000))
        XCTAssertEqual(pricing.exactNanos(10_000_000), 10_000_000_000_000_000_000)
        XCTAssertEqual(pricing.charge(9_000_000), 9_000_000_000_000_000_000, "9M tokens still fit")
        var state = RatingState()
        let result = RatingEngine(catalog: Self.listPrices).apply([usage("x", customer: "acme", model: "luxury", input: 10_000_000, offset: 0)], to: &state)
        XCTAssertEqual(result.unrateable.count, 1)
        XCTAssertTrue(result.ledger.isEmpty)
    }

    /// 1,100 events of 2^53 - 1 input tokens in one hour: the window's sum, 9,907,919,180,215,090,100,
    /// passes Int64; it is kept exactly and written as delta rows that each fit a bigint.
    func testWindowSumsPastInt64AreExactAndSplitIntoBigintRows() {
        var deltas = WindowDeltas(granularities: [.hour])
        for index in 0..<1_100 {
            deltas.add(UsageEvent(id: "e\(index)", source: "t", subject: "acme", time: EventTime("2026-03-10T00:00:00Z")!, model: "gpt-4o",
                                  inputTokens: Self.largestTokens, outputTokens: 1))
        }
        let rows = deltas.rows(.hour)
        XCTAssertEqual(rows.count, 1)
        let measures = rows[0].measures
        XCTAssertEqual(String(measures.inputTokens), "9907919180215090100")
        XCTAssertEqual(String(measures.totalTokens), "9907919180215091200")
        XCTAssertFalse(measures.fitsOneRow)
        let stored = measures.storedRows
        XCTAssertEqual(stored.count, 2)
        for (column, value) in measures.values.enumerated() {
            XCTAssertEqual(stored.reduce(Int128(0)) { $0 + Int128($1[column]) }, value, "column \(column) adds up")
        }
        XCTAssertEqual(stored.map { $0[6] }, [1_100, 0], "the event count once")
    }

    /// Three models at 5.00 per 1M, 1,000 input and 1,000 output tokens each: six lines of exactly
    /// 0.005 (0.03 in all) and a grant of 0.03 that pays all of it. The lines add up to 0.03, the
    /// credit applied is the 0.03 drawn, and nothing is due.
    func testInvoiceCreditsNeverExceedTheCreditDrawn() throws {
        let period = BillingPeriod.parse("2026-03", anchorDay: 1)!
        let five = PricingModel.perUnit(TokenRate.parse("5.00", perTokens: .perMillion)!)
        let catalog = Self.book(["a", "b", "c"].map { ModelPrices(model: $0, prices: [.input: five, .output: five]) })
        var state = RatingState()
        let records = [grant("g", customer: "acme", amount: "0.03", offset: 0)]
            + ["a", "b", "c"].enumerated().map { usage("u\($0)", customer: "acme", model: $1, input: 1_000, output: 1_000, offset: Int64($0 + 1)) }
        let result = RatingEngine(catalog: catalog).apply(records, to: &state)
        let drawn = -result.ledger.filter { $0.kind == .usage && $0.grantID != nil }.reduce(0) { $0 + $1.amountNanos }
        XCTAssertEqual(drawn, 30_000_000, "the wallet drew 0.03")
        var inputs = InvoiceInputs(customerID: "acme", period: period, currency: Self.usd)
        inputs.charges = state.charges.map { RatedCharge(periodStart: $0.key.periodStart, item: $0.key.item, quantity: $0.value.quantity,
                                                          amountNanos: $0.value.amountNanos, pricing: "5.00") }
        XCTAssertEqual(inputs.charges.map(\.amountNanos), Array(repeating: 5_000_000, count: 6))
        inputs.creditsDrawn = [period.start: Int128(drawn)]
        let invoice = try InvoiceBuilder.build(inputs)
        let usageLines = invoice.lines.filter { $0.kind == .usage }
        XCTAssertEqual(usageLines.count, 6)
        XCTAssertEqual(usageLines.reduce(0) { $0 + $1.amountNanos }, 30_000_000, "usage lines show 0.03")
        XCTAssertTrue(usageLines.allSatisfy { $0.amountNanos == 0 || $0.amountNanos == 10_000_000 }, "each within a cent of 0.005")
        XCTAssertEqual(invoice.lines.filter { $0.kind == .credits }.map(\.amountNanos), [-30_000_000], "credit applied = credit drawn")
        XCTAssertEqual(Self.usd.format(invoice.totalDueNanos), "0.00")
    }

    /// A period whose lines add up past the stored range is refused with a reason, not trapped on.
    func testAnInvoicePastTheLimitIsRefusedWithItsReason() {
        let period = BillingPeriod.parse("2026-03", anchorDay: 1)!
        var inputs = InvoiceInputs(customerID: "acme", period: period, currency: Self.usd)
        inputs.charges = ["a", "b"].map {
            RatedCharge(periodStart: period.start, item: PriceItem(bookName: "default", bookCustomer: "", bookVersion: 1, model: $0, tokenType: .input),
                        quantity: 1, amountNanos: 9_000_000_000_000_000_000, pricing: "p")
        }
        XCTAssertThrowsError(try InvoiceBuilder.build(inputs)) { error in
            XCTAssertTrue("\(error)".contains("total due passes the largest amount"), "\(error)")
        }
    }

    /// Gateway estimates and holds saturate instead of trapping: 4e15 reported tokens at 2.50/1M.
    func testGatewayEstimatesSaturate() {
        let counts = TokenCounts(input: 4_000_000_000_000_000, output: 4_000_000_000_000_000)
        let estimate = CallChargeEstimate.nanos(counts, model: "gpt-4o", customer: BillingProfile(customerID: "acme"), catalog: Self.listPrices, at: Self.start)
        XCTAssertEqual(estimate, Money.maxNanos, "4e15 × 2.50/1M + 4e15 × 10/1M = 5e10, past the limit: the hold is the limit")
        var reservations = CreditReservations()
        let snapshot = WalletSnapshot(balanceNanos: Int64.min + 1, raterNextOffsets: [:])
        _ = reservations.admit("acme", estimateNanos: Int64.max, snapshot: WalletSnapshot(balanceNanos: 10, raterNextOffsets: [:]), policy: .allow(limitNanos: nil))
        _ = reservations.admit("acme", estimateNanos: Int64.max, snapshot: WalletSnapshot(balanceNanos: 10, raterNextOffsets: [:]), policy: .allow(limitNanos: nil))
        XCTAssertEqual(reservations.available(to: "acme", snapshot: snapshot), Int64.min)
    }

    /// Int64.max tokens priced per started block of one token: the ceiling saturates instead of
    /// computing Int64.max + 1 blocks. A request's max_tokens past 2^53 − 1 is no bound at all
    /// (JSON integers Tally reads stop there), so the gateway's default output estimate applies.
    func testTheLargestMaxTokensDoesNotTrap() throws {
        XCTAssertEqual(PricingModel.package(size: 1, priceNanos: 10_000_000).marginalCeiling(Int64.max), Money.maxNanos)
        func bound(_ text: String) throws -> Int64? {
            try GatewayRequest.parse(.chatCompletions, body: Array(#"{"model":"m","max_tokens":\#(text),"messages":[]}"#.utf8)).get().maxOutputTokens
        }
        XCTAssertEqual(try bound("9007199254740991"), EventLimits.maxTokens)
        XCTAssertNil(try bound("9223372036854775807"))
    }

    /// Credit that pays only part of the usage shows at most what was drawn: 0.005 drawn for
    /// October's late usage and 0.005 for November's, against 2.005 of usage, show 0.01 in all
    /// (rounded one by one they would show 0.02); a single 0.015 shows 0.01.
    func testPartialCreditsNeverShowMoreThanWasDrawn() throws {
        let november = BillingPeriod.parse("2026-11", anchorDay: 1)!, october = BillingPeriod.parse("2026-10", anchorDay: 1)!
        var inputs = InvoiceInputs(customerID: "acme", period: november, currency: Self.usd)
        inputs.charges = [RatedCharge(periodStart: november.start, item: PriceItem(bookName: "default", bookCustomer: "", bookVersion: 1, model: "m", tokenType: .input),
                                      quantity: 1, amountNanos: 2_005_000_000, pricing: "p")]
        inputs.creditsDrawn = [october.start: 5_000_000, november.start: 5_000_000]
        var credits = try InvoiceBuilder.build(inputs).lines.filter { $0.kind == .credits }
        XCTAssertEqual(credits.count, 2)
        XCTAssertEqual(credits.reduce(0) { $0 + $1.amountNanos }, -10_000_000)
        inputs.creditsDrawn = [november.start: 15_000_000]
        credits = try InvoiceBuilder.build(inputs).lines.filter { $0.kind == .credits }
        XCTAssertEqual(credits.map(\.amountNanos), [-10_000_000])
    }

    /// Property: for extreme and random quantities and prices, `charge` never traps and equals the
    /// schoolbook result (rounded half up, or nil past `Money.maxNanos`).
    func testChargesMatchAnIndependentBigNumberCalculation() {
        var generator = SplitMix(seed: 19)
        let quantities: [Int64] = [0, 1, 2, 999_999, 1_000_000, Self.largestTokens - 1, Self.largestTokens, Int64.max - 1, Int64.max]
            + (0..<60).map { _ in Int64(bitPattern: generator.next() >> UInt64(generator.next() % 63)) & Int64.max }
        let prices = ["0", "0.000000001", "0.0375", "2.50", "15", "1000000000", "99999999999999999999", "1e-9",
                      "1.1428571428571428", "0.000000000000000001", "123456789.123456789"]
            + (0..<20).map { _ in "\(generator.next() % 1_000_000_000).\(generator.next() % 1_000_000_000)" }
        for price in prices {
            let rate = TokenRate.parse(price, perTokens: .perMillion)!
            for quantity in quantities {
                // units per token = price per 1M × 10^18; nanos = quantity × units / 10^15, half up.
                let product = DecimalText.multiply(String(quantity), String(rate.unitsPerToken))
                let expected = DecimalText.divideRoundingHalfUp(product, byPowerOfTen: 15)
                let fits = DecimalText.compare(expected, String(Int64.max)) <= 0
                let actual = PricingModel.perUnit(rate).charge(quantity)
                XCTAssertEqual(actual.map(String.init), fits ? expected : nil, "\(quantity) tokens at \(price)/1M")
                let blocks = PricingModel.package(size: 1_000, priceNanos: 7_000_000_000).charge(quantity)
                let blockCount = DecimalText.divideRoundingUp(String(quantity), byPowerOfTen: 3)
                let blockCharge = DecimalText.multiply(blockCount, "7000000000")
                XCTAssertEqual(blocks.map(String.init), DecimalText.compare(blockCharge, String(Int64.max)) <= 0 ? blockCharge : nil)
            }
        }
    }

    /// Property: random batches of extreme usage and grants over a few customers never trap, keep
    /// every balance equal to its ledger, and decide the same whatever the batch split.
    func testRandomExtremeRecordsNeverTrapAndKeepTheLedgerWhole() {
        var generator = SplitMix(seed: 7)
        let amounts: [Int64] = [1, Self.largestTokens, 1_000_000_000_000_000, 999_999, 4_000_000_000_000_000]
        var records: [RaterRecord] = []
        for offset in 0..<400 {
            let customer = "c\(generator.next() % 3)"
            if generator.next() % 5 == 0 {
                records.append(grant("g\(offset)", customer: customer, amount: ["999999999.999999999", "0.01", "12.5"][Int(generator.next() % 3)], offset: Int64(offset)))
            } else {
                records.append(usage("u\(offset)", customer: customer, model: ["gpt-4o", "luxury"][Int(generator.next() % 2)],
                                     input: amounts[Int(generator.next() % 5)], output: amounts[Int(generator.next() % 5)], offset: Int64(offset)))
            }
        }
        func run(batchSize: Int) -> (RatingState, [LedgerEntry], [String]) {
            var state = RatingState()
            var ledger: [LedgerEntry] = []
            var kept: [String] = []
            for start in stride(from: 0, to: records.count, by: batchSize) {
                let result = RatingEngine(catalog: Self.listPrices).apply(Array(records[start..<min(start + batchSize, records.count)]), to: &state)
                ledger += result.ledger
                kept += result.unrateable.map(\.record.key.eventID)
            }
            return (state, ledger, kept)
        }
        let whole = run(batchSize: records.count)
        XCTAssertFalse(whole.2.isEmpty, "the mix reaches the limits")
        for customer in ["c0", "c1", "c2"] {
            let key = WalletKey(customerID: customer, currency: Self.usd)
            let sum = whole.1.filter { $0.wallet == key }.reduce(Int128(0)) { $0 + Int128($1.amountNanos) }
            XCTAssertEqual(Int128(whole.0[wallet: key]?.balanceNanos ?? 0), sum, "\(customer): balance = sum of entries")
        }
        for size in [1, 7, 64] {
            let split = run(batchSize: size)
            XCTAssertEqual(split.0.charges, whole.0.charges, "batch size \(size)")
            XCTAssertEqual(split.1, whole.1, "batch size \(size)")
            XCTAssertEqual(split.2, whole.2, "batch size \(size)")
        }
    }
}

/// A deterministic random source for property tests.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Non-negative integers as decimal digit strings, with schoolbook arithmetic: the independent
/// reference for money tests (no fixed width, nothing shared with Tally's code).
enum DecimalText {
    static func normalized(_ digits: String) -> String {
        let trimmed = digits.drop { $0 == "0" }
        return trimmed.isEmpty ? "0" : String(trimmed)
    }

    static func compare(_ a: String, _ b: String) -> Int {
        let a = normalized(a), b = normalized(b)
        if a.count != b.count { return a.count < b.count ? -1 : 1 }
        return a == b ? 0 : (a < b ? -1 : 1)
    }

    static func multiply(_ a: String, _ b: String) -> String {
        let x = a.utf8.reversed().map { Int($0) - 48 }, y = b.utf8.reversed().map { Int($0) - 48 }
        var result = Array(repeating: 0, count: x.count + y.count)
        for (i, dx) in x.enumerated() {
            var carry = 0
            for (j, dy) in y.enumerated() {
                let sum = result[i + j] + dx * dy + carry
                result[i + j] = sum % 10
                carry = sum / 10
            }
            var k = i + y.count
            while carry > 0 {
                let sum = result[k] + carry
                result[k] = sum % 10
                carry = sum / 10
                k += 1
            }
        }
        return normalized(String(result.reversed().map { Character(String($0)) }))
    }

    static func addOne(_ a: String) -> String {
        var digits = Array(normalized(a).utf8.map { Int($0) - 48 })
        var index = digits.count - 1
        while index >= 0 {
            if digits[index] == 9 { digits[index] = 0; index -= 1 } else { digits[index] += 1; break }
        }
        if index < 0 { digits.insert(1, at: 0) }
        return String(digits.map { Character(String($0)) })
    }

    /// a / 10^n, rounded half up (half away from zero for non-negative a).
    static func divideRoundingHalfUp(_ a: String, byPowerOfTen n: Int) -> String {
        let a = normalized(a)
        guard a.count > n else { return a.count == n && a.first! >= "5" ? "1" : "0" }
        let quotient = String(a.dropLast(n)), firstDropped = a.dropFirst(a.count - n).first
        return n > 0 && firstDropped! >= "5" ? addOne(quotient) : normalized(quotient)
    }

    /// a / 10^n, rounded up.
    static func divideRoundingUp(_ a: String, byPowerOfTen n: Int) -> String {
        let a = normalized(a)
        guard a.count > n else { return a == "0" ? "0" : "1" }
        let quotient = String(a.dropLast(n)), rest = a.suffix(n)
        return rest.contains { $0 != "0" } ? addOne(quotient) : normalized(quotient)
    }
}
