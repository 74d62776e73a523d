import TallyCore
import XCTest

/// Every pricing model against hand-computed examples. Amounts are nano-units (1e-9 USD).
final class PricingTests: XCTestCase {
    func rate(_ text: String) -> TokenRate { TokenRate.parse(text, perTokens: .perMillion)! }

    func testDecimalsParseExactly() {
        XCTAssertEqual(ExactDecimal("3e-06")?.scaled(15), 3_000_000_000)
        XCTAssertEqual(ExactDecimal("2.50")?.scaled(9), 2_500_000_000)
        XCTAssertEqual(ExactDecimal("-0.1")?.scaled(2), -10)
        XCTAssertEqual(ExactDecimal("1.25E-7")?.scaled(15), 125_000_000)
        XCTAssertNil(ExactDecimal("0.1")?.scaled(0), "dropping digits is refused, never rounded")
        XCTAssertNil(ExactDecimal("1,5"))
        XCTAssertNil(ExactDecimal("abc"))
        XCTAssertNil(ExactDecimal(""))
        XCTAssertEqual(Money.nanos("12.5"), 12_500_000_000)
        XCTAssertNil(Money.nanos("0.0000000001"), "finer than a nano-unit")
        XCTAssertEqual(TokenRate.parse("3.75e-08", perTokens: .perToken)?.perMillionText, "0.0375")
        XCTAssertEqual(TokenRate.parse("1e-16", perTokens: .perToken)?.unitsPerToken, 100_000_000)
        // LiteLLM's 8.00 / 7M tokens, exactly: 1.1428571428571428e-06 per token is 1.1428571428571428 per 1M.
        XCTAssertEqual(TokenRate.parse("1.1428571428571428e-06", perTokens: .perToken)?.perMillionText, "1.1428571428571428")
        XCTAssertNil(TokenRate.parse("1e-25", perTokens: .perToken), "finer than 10^-24 per token")
        XCTAssertNil(TokenRate.parse("-1", perTokens: .perMillion))
    }

    func testCurrencyRoundingAndFormatting() {
        let usd = Currency("USD")!
        XCTAssertEqual(usd.roundToMinorUnit(12_345_000_000), 12_350_000_000, "12.345 rounds half away from zero")
        XCTAssertEqual(usd.roundToMinorUnit(-12_345_000_000), -12_350_000_000)
        XCTAssertEqual(usd.format(12_344_999_999 as Int64), "12.34")
        XCTAssertEqual(Currency("JPY")!.format(1_500_000_000 as Int64), "2")
        XCTAssertEqual(Money.format(nanos: 75 as Int64), "0.000000075")
        XCTAssertEqual(Money.format(nanos: 2_500_000_000 as Int64), "2.50")
        XCTAssertNil(Currency("usd"))
    }

    func testPerUnitCharges() {
        let price = PricingModel.perUnit(rate("2.50"))
        XCTAssertEqual(price.charge(1_000_000), 2_500_000_000)
        XCTAssertEqual(price.charge(1), 2_500)
        XCTAssertEqual(price.charge(0), 0)
        // 0.0375 per 1M tokens: one token is 37.5 nano-units, rounded half away from zero.
        let cheap = PricingModel.perUnit(rate("0.0375"))
        XCTAssertEqual(cheap.charge(1), 38)
        XCTAssertEqual(cheap.charge(2), 75)
        XCTAssertEqual(cheap.charge(3), 113)
    }

    func testPackageRoundsUpToWholeBlocks() {
        let price = PricingModel.package(size: 1_000, priceNanos: Money.nanos("0.02")!)
        XCTAssertEqual(price.charge(0), 0)
        XCTAssertEqual(price.charge(1), 20_000_000)
        XCTAssertEqual(price.charge(1_000), 20_000_000)
        XCTAssertEqual(price.charge(1_001), 40_000_000)
        XCTAssertEqual(price.charge(2_000), 40_000_000)
    }

    func testGraduatedTiersChargeEachBandAtItsRate() {
        let price = PricingModel.graduated([PriceTier(upTo: 1_000, rate: rate("3.00")), PriceTier(upTo: 10_000, rate: rate("2.00")),
                                            PriceTier(upTo: nil, rate: rate("1.00"))])
        XCTAssertEqual(price.charge(1_000), 3_000_000)            // 1000 × 3e-6
        XCTAssertEqual(price.charge(1_001), 3_002_000)            // + 1 × 2e-6
        XCTAssertEqual(price.charge(10_000), 21_000_000)          // 0.003 + 9000 × 2e-6
        XCTAssertEqual(price.charge(10_500), 21_500_000)          // + 500 × 1e-6
    }

    func testVolumeTiersChargeAllTokensAtTheReachedTier() {
        let price = PricingModel.volume([PriceTier(upTo: 1_000, rate: rate("3.00")), PriceTier(upTo: nil, rate: rate("2.00"))])
        XCTAssertEqual(price.charge(1_000), 3_000_000)
        XCTAssertEqual(price.charge(1_001), 2_002_000, "crossing the boundary reprices every token")
    }

    func book(_ name: String = "default", customer: String? = nil, version: Int, from: String, models: [ModelPrices]) -> PriceBook {
        PriceBook(name: name, customerID: customer, version: version, effectiveFrom: EventTime(from)!, currency: Currency("USD")!, models: models)
    }

    func testEffectiveDatingOverridesAndAliases() {
        let v1 = book(version: 1, from: "2026-01-01T00:00:00Z", models: [
            ModelPrices(model: "gpt-4o", aliases: ["gpt-4o-2024-08-06"], prices: [.input: .perUnit(rate("2.50")), .output: .perUnit(rate("10"))]),
            ModelPrices(model: "claude-sonnet-4", aliases: ["claude-sonnet-4-*"], prices: [.input: .perUnit(rate("3")), .output: .perUnit(rate("15"))]),
        ])
        let v2 = book(version: 2, from: "2026-06-01T00:00:00Z", models: [
            ModelPrices(model: "gpt-4o", prices: [.input: .perUnit(rate("2.00")), .output: .perUnit(rate("8"))]),
        ])
        let acme = book("acme-deal", customer: "acme", version: 1, from: "2026-01-01T00:00:00Z", models: [
            ModelPrices(model: "gpt-4o", prices: [.input: .perUnit(rate("1.00")), .output: .perUnit(rate("4"))]),
        ])
        let catalog = PriceCatalog(books: [v1, v2, acme])
        func match(_ customer: String, _ model: String, _ time: String) -> (Int, String, PricingModel?)? {
            catalog.match(customerID: customer, plan: "default", model: model, at: EventTime(time)!).map {
                ($0.book.version, $0.book.name, $0.prices.prices[.input])
            }
        }
        XCTAssertEqual(match("bob", "gpt-4o", "2026-03-01T00:00:00Z")?.2, .perUnit(rate("2.50")))
        XCTAssertEqual(match("bob", "gpt-4o", "2026-05-31T23:59:59Z")?.0, 1)
        XCTAssertEqual(match("bob", "gpt-4o", "2026-06-01T00:00:00Z")?.0, 2, "the version in force at the event time")
        XCTAssertNil(match("bob", "gpt-4o", "2025-12-31T23:59:59Z"), "no book in force yet: unpriced")
        XCTAssertNil(match("bob", "claude-sonnet-4", "2026-07-01T00:00:00Z"), "v2 replaced v1 whole and does not price it")
        XCTAssertEqual(match("bob", "gpt-4o-2024-08-06", "2026-03-01T00:00:00Z")?.2, .perUnit(rate("2.50")), "dated alias")
        XCTAssertEqual(match("bob", "openai/gpt-4o", "2026-03-01T00:00:00Z")?.2, .perUnit(rate("2.50")), "provider prefix")
        XCTAssertEqual(match("bob", "claude-sonnet-4-20250514", "2026-03-01T00:00:00Z")?.1, "default", "prefix alias")
        XCTAssertEqual(match("acme", "gpt-4o", "2026-03-01T00:00:00Z")?.2, .perUnit(rate("1.00")), "the override wins")
        XCTAssertEqual(match("acme", "claude-sonnet-4", "2026-03-01T00:00:00Z")?.1, "default", "models the override lacks fall back")
        XCTAssertNil(match("bob", "mystery-model", "2026-03-01T00:00:00Z"))
    }

    func testQuantitiesSplitCachedAndReasoningTokens() {
        let event = UsageEvent(id: "e", source: "s", subject: "c", time: EventTime("2026-03-01T00:00:00Z")!, model: "m",
                               inputTokens: 1_000, outputTokens: 500, cacheReadInputTokens: 300, cacheWriteInputTokens: 100, reasoningOutputTokens: 200)
        let full = ModelPrices(model: "m", prices: [.input: .perUnit(rate("1")), .output: .perUnit(rate("1")), .cacheRead: .perUnit(rate("1")),
                                                   .cacheWrite: .perUnit(rate("1")), .reasoning: .perUnit(rate("1"))])
        XCTAssertEqual(full.quantities(event).map { "\($0.0.rawValue)=\($0.1)" }, ["input=600", "output=300", "cache_read=300", "cache_write=100", "reasoning=200"])
        let plain = ModelPrices(model: "m", prices: [.input: .perUnit(rate("1")), .output: .perUnit(rate("1"))])
        XCTAssertEqual(plain.quantities(event).map { "\($0.0.rawValue)=\($0.1)" }, ["input=1000", "output=500"],
                       "without their own prices, cached tokens bill as input and reasoning as output")
    }

    func testBillingPeriodsFollowTheAnchorDay() {
        let p = BillingPeriod.containing(EventTime("2026-03-14T10:00:00Z")!.microseconds, anchorDay: 15)
        XCTAssertEqual(EventTime.format(microseconds: p.start), "2026-02-15T00:00:00Z")
        XCTAssertEqual(EventTime.format(microseconds: p.end), "2026-03-15T00:00:00Z")
        XCTAssertEqual(p.label, "2026-02")
        let january = BillingPeriod.containing(EventTime("2026-01-03T00:00:00Z")!.microseconds, anchorDay: 5)
        XCTAssertEqual(january.label, "2025-12")
        XCTAssertEqual(BillingPeriod.parse("2026-11", anchorDay: 1)?.start, EventTime("2026-11-01T00:00:00Z")!.microseconds)
        XCTAssertNil(BillingPeriod.parse("2026-13", anchorDay: 1))
    }
}

final class PriceBookDocumentTests: XCTestCase {
    static let yaml = """
        # Our list prices
        book: default
        effective_from: 2026-01-01T00:00:00Z
        currency: USD
        minimum_per_period: "20.00"
        models:
          - model: gpt-4o
            aliases: [gpt-4o-2024-08-06, "openai/gpt-4o-*"]
            input: "2.50"      # per 1M tokens
            output: "10.00"
            cache_read: 1.25
          - model: big-model
            input:
              graduated:
                - { up_to: 1000000, price: "3.00" }
                - price: "2.50"
            output: { package: { size: 1000, price: "0.02" } }
            reasoning:
              volume:
                - up_to: 1000
                  price: '4'
                - price: '3'
        """

    func testYAMLBookParses() throws {
        let book = try PriceBookDocument.parse(Self.yaml)
        XCTAssertEqual(book.name, "default")
        XCTAssertEqual(book.minimumPerPeriodNanos, 20_000_000_000)
        XCTAssertEqual(book.models.map(\.model), ["gpt-4o", "big-model"])
        XCTAssertEqual(book.models[0].aliases, ["gpt-4o-2024-08-06", "openai/gpt-4o-*"])
        XCTAssertEqual(book.models[0].prices[.cacheRead], .perUnit(TokenRate.parse("1.25", perTokens: .perMillion)!))
        XCTAssertEqual(book.models[1].prices[.input], .graduated([
            PriceTier(upTo: 1_000_000, rate: TokenRate.parse("3", perTokens: .perMillion)!),
            PriceTier(upTo: nil, rate: TokenRate.parse("2.5", perTokens: .perMillion)!)]))
        XCTAssertEqual(book.models[1].prices[.output], .package(size: 1000, priceNanos: 20_000_000))
        XCTAssertEqual(book.models[1].prices[.reasoning], .volume([
            PriceTier(upTo: 1000, rate: TokenRate.parse("4", perTokens: .perMillion)!),
            PriceTier(upTo: nil, rate: TokenRate.parse("3", perTokens: .perMillion)!)]))
    }

    func testCanonicalJSONRoundTrips() throws {
        let book = try PriceBookDocument.parse(Self.yaml)
        let json = PriceBookDocument.canonicalJSON(book)
        XCTAssertEqual(try PriceBookDocument.parse(json), book)
    }

    /// A book may price meters (per unit, any pricing model), and may price only meters.
    func testMeterPricesParseAndRoundTrip() throws {
        let book = try PriceBookDocument.parse("""
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            meters:
              - { meter: vector_searches, price: "0.002" }
              - { meter: web_search_requests, price: { package: { size: 1000, price: "10.00" } } }
              - { meter: images, price: { graduated: [{ up_to: 100, price: "0.04" }, { price: "0.0125" }] } }
            """)
        XCTAssertTrue(book.models.isEmpty)
        XCTAssertEqual(book.price(ofMeter: "vector_searches"), .perUnit(TokenRate.parse("0.002", perTokens: .perToken)!))
        XCTAssertEqual(book.price(ofMeter: "web_search_requests"), .package(size: 1000, priceNanos: 10_000_000_000))
        let canonical = PriceBookDocument.canonicalJSON(book)
        XCTAssertTrue(canonical.contains(#""price":"0.002""#), canonical)
        XCTAssertEqual(try PriceBookDocument.parse(canonical), book)
        for (text, path) in [("meters:\n  - { meter: Bad, price: \"1\" }", "meters[0].meter"),
                             ("meters:\n  - { meter: a }", "meters[0].price"),
                             ("meters:\n  - { meter: a, price: \"1\" }\n  - { meter: a, price: \"2\" }", "meters[1].meter"),
                             ("meters: []", "models")] {
            XCTAssertThrowsError(try PriceBookDocument.parse("effective_from: 2026-01-01T00:00:00Z\ncurrency: USD\n" + text)) { error in
                XCTAssertEqual((error as? ConfigError)?.path, path, "\(text): \(error)")
            }
        }
    }

    func testErrorsNameTheLineAndField() {
        func error(_ text: String) -> ConfigError? {
            do { _ = try PriceBookDocument.parse(text); return nil } catch { return error }
        }
        let badPrice = Self.yaml.replacingOccurrences(of: "output: \"10.00\"", with: "output: \"ten\"")
        XCTAssertEqual(error(badPrice)?.line, 10)
        XCTAssertEqual(error(badPrice)?.path, "models[0].output")
        let badTier = Self.yaml.replacingOccurrences(of: "- price: \"2.50\"", with: "- { up_to: 5, price: \"2.50\" }")
        XCTAssertEqual(error(badTier)?.path, "models[1].input.graduated[1].up_to")
        XCTAssertEqual(error(badTier)?.line, 16)
        let unknown = Self.yaml.replacingOccurrences(of: "currency: USD", with: "currency: USD\ncolour: blue")
        XCTAssertEqual(error(unknown)?.description, "line 5, colour: unknown field")
        let json = #"{"book": "default", "effective_from": "2026-01-01T00:00:00Z", "currency": "USD", "models": [{"model": "m", "input": "1"}]}"#
        XCTAssertEqual(error(json)?.path, "models[0].output")
        XCTAssertEqual(error("book: x\n  bad: indent")?.line, 2)
        XCTAssertEqual(error(#"{"book": 1,}"#)?.line, 1)
        XCTAssertNotNil(error(Self.yaml.replacingOccurrences(of: "effective_from: 2026-01-01T00:00:00Z", with: "effective_from: yesterday")))
    }

    func testLiteLLMImportParsesExponentsExactly() throws {
        let litellm = """
            {
              "sample_spec": {"input_cost_per_token": 0, "output_cost_per_token": 0},
              "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
                         "litellm_provider": "openai", "max_tokens": 16384},
              "o1": {"input_cost_per_token": 1.5e-05, "output_cost_per_token": 6e-05, "output_cost_per_reasoning_token": 6e-05},
              "claude-3-haiku": {"input_cost_per_token": 2.5e-07, "output_cost_per_token": 1.25e-06,
                                 "cache_creation_input_token_cost": 3e-07, "cache_read_input_token_cost": 3e-08},
              "dall-e-3": {"output_cost_per_image": 0.04}
            }
            """
        let imported = try PriceBookDocument.importLiteLLM(litellm, name: "default", effectiveFrom: EventTime("2026-01-01T00:00:00Z")!, currency: Currency("USD")!)
        let book = imported.book
        XCTAssertEqual(imported.skipped.map(\.model), ["dall-e-3"])
        XCTAssertEqual(imported.skipped.first?.reason, "no per-token input and output costs (has output_cost_per_image)")
        let byName = Dictionary(uniqueKeysWithValues: book.models.map { ($0.model, $0) })
        XCTAssertEqual(byName["gpt-4o"]?.prices[.input], .perUnit(TokenRate.parse("2.50", perTokens: .perMillion)!))
        XCTAssertEqual(byName["gpt-4o"]?.prices[.cacheRead], .perUnit(TokenRate.parse("1.25", perTokens: .perMillion)!))
        XCTAssertEqual(byName["claude-3-haiku"]?.prices[.cacheRead], .perUnit(TokenRate.parse("0.03", perTokens: .perMillion)!))
        XCTAssertEqual(byName["o1"]?.prices[.reasoning], .perUnit(TokenRate.parse("60", perTokens: .perMillion)!))
        // 1M cache-read tokens at 3e-08 per token is exactly 0.03.
        XCTAssertEqual(byName["claude-3-haiku"]?.prices[.cacheRead]?.charge(1_000_000), 30_000_000)
    }
}
