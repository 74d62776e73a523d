import TallyCore
import XCTest

/// Price rules: which rule prices a call (precedence), how books spell them, and what the rating
/// engine charges at them. Expected amounts are worked out by hand from the book's rates.
final class PriceRuleTests: XCTestCase {
    static let book = """
        book: default
        effective_from: 2026-01-01T00:00:00Z
        currency: USD
        models:
          - model: gpt-4o
            aliases: ["openai/gpt-4o-*"]
            input: "2.50"
            output: "10.00"
            cache_read: "1.25"
            rules:
              - { rule: summaries, when: { feature: summarize }, input: "5.00", output: "20.00" }
              - { rule: priority, when: { service_tier: [priority, scale] }, input: "4.25", output: "17.00" }
              - { rule: priority-summaries, when: { feature: summarize, service_tier: priority }, output: "30.00" }
              - { rule: batch, when: { batch: "true" }, input: "1.25", output: "5.00", cache_read: "0.625" }
              - { rule: failed, when: { status: [error, cancelled] } }
          - model: gemini-2.5-pro
            input: "1.25"
            output: "10.00"
            context_tiers: [{ above_input_tokens: 200000, input: "2.50", output: "15.00" }]
            rules:
              - rule: batch
                when: { batch: "true" }
                input: "0.625"
                output: "5.00"
                context_tiers: [{ above_input_tokens: 200000, input: "1.25", output: "7.50" }]
              - { rule: eu, when: { region: eu } }
        meters:
          - meter: vector_searches
            price: "0.002"
            rules:
              - { rule: eu, when: { region: eu }, price: "0.003" }
        """
    static let override = """
        book: default
        customer: vip
        effective_from: 2026-01-01T00:00:00Z
        currency: USD
        models:
          - { model: gpt-4o, input: "2.00", output: "8.00" }
        """

    func rate(_ text: String) -> PricingModel { .perUnit(TokenRate.parse(text, perTokens: .perMillion)!) }

    func event(_ id: String = "e", customer: String = "acme", model: String = "gpt-4o", feature: String? = nil, input: Int64 = 1_000_000,
               output: Int64 = 0, properties: [String: String] = [:], meters: [String: Int64] = [:]) -> UsageEvent {
        UsageEvent(id: id, source: "t", subject: customer, time: EventTime("2026-03-10T00:00:00Z")!, model: model, feature: feature,
                   inputTokens: input, outputTokens: output, properties: properties, meters: meters)
    }

    /// Precedence: the customer's override first; within a book, of the rules whose conditions
    /// all hold, the one with the most conditions, then the first listed; else the base prices.
    func testTheMostSpecificRuleWinsAndOverridesComeFirst() throws {
        var plan = try PriceBookDocument.parse(Self.book)
        plan.version = 1
        var vip = try PriceBookDocument.parse(Self.override)
        vip.version = 1
        let catalog = PriceCatalog(books: [plan, vip])
        func rule(_ event: UsageEvent) -> (String, PricingModel?) {
            let match = catalog.match(customerID: event.subject, plan: "default", model: event.model, at: event.time)!
            let (name, prices) = match.prices.resolve(for: event)
            return ((match.book.customerID.map { "\($0):" } ?? "") + name, prices.prices[.output])
        }
        XCTAssertEqual(rule(event()).0, "", "no condition holds: the base prices")
        XCTAssertEqual(rule(event(feature: "summarize")).0, "summaries")
        XCTAssertEqual(rule(event(properties: ["service_tier": "scale"])).0, "priority", "any of a condition's values")
        XCTAssertEqual(rule(event(properties: ["service_tier": "flex"])).0, "")
        // Two conditions beat one; the rule's output price is its own, its input the model's base.
        let both = event(feature: "summarize", properties: ["service_tier": "priority"])
        XCTAssertEqual(rule(both).0, "priority-summaries")
        XCTAssertEqual(rule(both).1, rate("30.00"))
        let match = catalog.match(customerID: "acme", plan: "default", model: "gpt-4o", at: both.time)!
        XCTAssertEqual(match.prices.resolve(for: both).prices.prices[.input], rate("2.50"))
        // Equally specific rules that both hold: the first listed.
        XCTAssertEqual(rule(event(feature: "summarize", properties: ["service_tier": "scale"])).0, "summaries")
        XCTAssertEqual(rule(event(feature: "summarize", properties: ["batch": "true"])).0, "summaries")
        // The label wins over a property of the same name; values compare byte for byte.
        XCTAssertEqual(rule(event(feature: "chat", properties: ["feature": "summarize"])).0, "")
        XCTAssertEqual(rule(event(feature: "Summarize")).0, "")
        XCTAssertEqual(rule(event(properties: ["status": "cancelled"])).0, "failed")
        // A model matched by a wildcard alias takes the model's rules.
        XCTAssertEqual(rule(event(model: "openai/gpt-4o-2024-11-20", feature: "summarize")).0, "summaries")
        // The customer's override prices the model: its (base) prices win over every plan rule.
        XCTAssertEqual(rule(event(customer: "vip", feature: "summarize")).0, "vip:")
        XCTAssertEqual(rule(event(customer: "vip", feature: "summarize")).1, rate("8.00"))
    }

    /// What the engine charges at each rule: quantities accumulate per rule, invoice items name it,
    /// context tiers are the rule's own, and a rule without prices splits calls off at the base prices.
    func testCallsAreChargedAtTheirRulesRates() throws {
        var plan = try PriceBookDocument.parse(Self.book)
        plan.version = 1
        let engine = RatingEngine(catalog: PriceCatalog(books: [plan]))
        let records: [UsageEvent] = [
            event("base", input: 1_000_000, output: 100_000),                                        // 2.50 + 1.00
            event("sum", feature: "summarize", input: 200_000, output: 50_000),                      // 1.00 + 1.00
            event("prio", input: 400_000, output: 100_000, properties: ["service_tier": "priority"]), // 1.70 + 1.70
            event("batch", input: 2_000_000, output: 200_000, properties: ["batch": "true"]),        // 2.50 + 1.00
            event("err", input: 100_000, properties: ["status": "error"]),                           // 0.25 at base prices
            // Gemini batch above 200k input tokens: the rule's own tier, half the full tier's rates.
            event("gbatch", model: "gemini-2.5-pro", input: 400_000, output: 10_000, properties: ["batch": "true"]), // 0.50 + 0.075
            // A rule without prices keeps the model's context tiers.
            event("geu", model: "gemini-2.5-pro", input: 300_000, properties: ["region": "eu"]),   // 0.75 (tier 2.50)
            event("vs", model: "", input: 0, properties: ["region": "eu"], meters: ["vector_searches": 1_000]), // 3.00
        ]
        var state = RatingState()
        let result = engine.apply(records.enumerated().map { index, event in
            .usage(PositionedEvent(event: event, position: LogPosition(partition: 0, offset: Int64(index))))
        }, to: &state)
        XCTAssertTrue(result.unpriced.isEmpty && result.unrateable.isEmpty)
        var charged: [String: Int64] = [:]
        for (key, total) in state.charges {
            let name = "\(key.item.model) \(key.item.tokenType.rawValue)\(key.item.contextAbove > 0 ? ">\(key.item.contextAbove)" : "") \(key.item.rule)"
            charged[name] = total.amountNanos
        }
        XCTAssertEqual(charged, [
            "gpt-4o input ": 2_500_000_000, "gpt-4o output ": 1_000_000_000,
            "gpt-4o input summaries": 1_000_000_000, "gpt-4o output summaries": 1_000_000_000,
            "gpt-4o input priority": 1_700_000_000, "gpt-4o output priority": 1_700_000_000,
            "gpt-4o input batch": 2_500_000_000, "gpt-4o output batch": 1_000_000_000,
            "gpt-4o input failed": 250_000_000,
            "gemini-2.5-pro input>200000 batch": 500_000_000, "gemini-2.5-pro output>200000 batch": 75_000_000,
            "gemini-2.5-pro input>200000 eu": 750_000_000,
            "vector_searches meter eu": 3_000_000_000,
        ])
        let lines = try InvoiceBuilder.build({
            var inputs = InvoiceInputs(customerID: "acme", period: BillingPeriod(start: EventTime("2026-03-01T00:00:00Z")!.microseconds,
                                                                                 end: EventTime("2026-04-01T00:00:00Z")!.microseconds),
                                       currency: Currency("USD")!)
            inputs.charges = state.charges.map { key, total in
                RatedCharge(periodStart: key.periodStart, item: key.item, quantity: total.quantity, amountNanos: total.amountNanos, pricing: "")
            }
            return inputs
        }()).lines.map(\.description)
        XCTAssertTrue(lines.contains("gpt-4o input tokens (rule summaries)"), "\(lines)")
        XCTAssertTrue(lines.contains("vector_searches (meter) (rule eu)"), "\(lines)")
        XCTAssertTrue(lines.contains("gpt-4o input tokens"), "\(lines)")
        // The stored item leads back to the rule's rates.
        let item = state.charges.keys.first { $0.item.rule == "batch" && $0.item.tokenType == .output && $0.item.model == "gpt-4o" }!.item
        XCTAssertEqual(engine.catalog.pricing(of: item)?.pricing, rate("5.00"))
    }

    /// The gateway's hold covers the dearest of the base prices and every rule's; once the call
    /// is answered, it settles at the rule the call's properties pick.
    func testTheGatewayHoldCoversEveryRule() throws {
        let catalog = PriceCatalog(books: [try PriceBookDocument.parse(Self.book)])
        let hold = CallChargeEstimate.nanos(TokenCounts(input: 1_000_000, output: 1_000_000), model: "gpt-4o",
                                            customer: BillingProfile(customerID: "acme"), catalog: catalog, at: EventTime("2026-03-10T00:00:00Z")!)
        // priority-summaries: input at the base 2.50, output at 30.00; priority: 4.25 + 17.00; summaries 5.00 + 20.00 = 25.00.
        XCTAssertEqual(hold, 32_500_000_000)
        // Once answered, the call's own rule: a batch call settles at 1.25 + 5.00.
        let batchCall = event(properties: ["batch": "true"])
        let settled = CallChargeEstimate.nanos(TokenCounts(input: 1_000_000, output: 1_000_000), model: "gpt-4o",
                                               customer: BillingProfile(customerID: "acme"), catalog: catalog, at: EventTime("2026-03-10T00:00:00Z")!,
                                               call: batchCall)
        XCTAssertEqual(settled, 6_250_000_000)
    }

    func testRulesParseRoundTripAndRefuseMistakes() throws {
        let book = try PriceBookDocument.parse(Self.book)
        XCTAssertEqual(book.models[0].rules.map(\.name), ["summaries", "priority", "priority-summaries", "batch", "failed"])
        XCTAssertEqual(book.models[0].rules[1].conditions, [PriceCondition(dimension: "service_tier", values: ["priority", "scale"])])
        XCTAssertEqual(book.models[0].rules[4].prices, book.models[0].withoutAliases, "a rule without prices is the model's prices")
        XCTAssertEqual(try PriceBookDocument.parse(PriceBookDocument.canonicalJSON(book)), book)
        let header = "effective_from: 2026-01-01T00:00:00Z\ncurrency: USD\n"
        for (text, path) in [
            ("models:\n  - { model: m, input: \"1\", output: \"1\", rules: [{ rule: r, input: \"2\" }] }", "models[0].rules[0].when"),
            ("models:\n  - { model: m, input: \"1\", output: \"1\", rules: [{ when: { feature: a } }] }", "models[0].rules[0].rule"),
            ("models:\n  - { model: m, input: \"1\", output: \"1\", rules: [{ rule: r, when: {} }] }", "models[0].rules[0].when"),
            ("models:\n  - { model: m, input: \"1\", output: \"1\", rules: [{ rule: r, when: { model: x } }] }", "models[0].rules[0].when.model"),
            ("models:\n  - { model: m, input: \"1\", output: \"1\", rules: [{ rule: r, when: { feature: [] } }] }", "models[0].rules[0].when.feature"),
            ("models:\n  - { model: m, input: \"1\", output: \"1\", rules: [{ rule: r, when: { a: b } }, { rule: r, when: { a: c } }] }", "models[0].rules[1].rule"),
            ("models:\n  - { model: m, input: \"1\", output: \"1\", rules: [{ rule: r, when: { a: b }, colour: red }] }", "models[0].rules[0].colour"),
            ("models:\n  - { model: m, input: \"1\", output: \"1\", context_tiers: [{ above_input_tokens: 10, input: \"2\" }], rules: [{ rule: r, when: { a: b }, input: \"3\" }] }",
             "models[0].rules[0].context_tiers"),
            ("meters:\n  - { meter: v, price: \"1\", rules: [{ rule: r, when: { a: b } }] }", "meters[0].rules[0].price"),
        ] {
            XCTAssertThrowsError(try PriceBookDocument.parse(header + text)) { error in
                XCTAssertEqual((error as? ConfigError)?.path, path, "\(text): \(error)")
            }
        }
    }
}
