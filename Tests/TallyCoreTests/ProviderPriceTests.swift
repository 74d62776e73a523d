import Foundation
import TallyCore
import XCTest

/// Issue #19: every price a provider charges has a place (1-hour cache writes, context tiers),
/// the LiteLLM import keeps every price exactly, and the example price book prices dated models
/// right. Expected amounts are worked out by hand from the providers' list prices.
final class ProviderPriceTests: XCTestCase {
    static let usd = Currency("USD")!

    func rate(_ perMillion: String) -> PricingModel { .perUnit(TokenRate.parse(perMillion, perTokens: .perMillion)!) }

    /// The nano-units one event is charged under `catalog` (a fresh period).
    func charge(_ event: UsageEvent, _ catalog: PriceCatalog) -> Int64 {
        var state = RatingState()
        let result = RatingEngine(catalog: catalog).apply([.usage(PositionedEvent(event: event, position: LogPosition(partition: 0, offset: 0)))], to: &state)
        XCTAssertTrue(result.unpriced.isEmpty && result.unrateable.isEmpty)
        return -result.ledger.reduce(0) { $0 + $1.amountNanos }
    }

    func book(_ models: [ModelPrices]) -> PriceCatalog {
        PriceCatalog(books: [PriceBook(name: "default", version: 1, effectiveFrom: EventTime("2026-01-01T00:00:00Z")!, currency: Self.usd, models: models)])
    }

    /// `/v1/usage/anthropic` for a model at 3.00 / 15.00 with 400,000 cache-write tokens, all of them
    /// 1-hour writes, input 10 and output 100: 10 × 3 + 100 × 15 + 400,000 × 6.00 (2 × input) per 1M
    /// = 0.00003 + 0.0015 + 2.4 = 2.40153 USD (not 1.50153, the 5-minute rate of 3.75).
    func testAnthropicOneHourCacheWritesAreBilledAtTheirOwnRate() throws {
        let body = #"{"id":"m1","customer":"acme","model":"claude-sonnet-4","time":"2026-03-01T12:00:00Z","usage":{"input_tokens":10,"output_tokens":100,"cache_creation_input_tokens":400000,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":400000}}}"#
        let encoded = try ProviderEventBuilder.build(.anthropic, body: Array(body.utf8)).get()
        guard case .success(.usage(let event)) = EventDecoder.decode(encoded) else { return XCTFail("not a usage event") }
        XCTAssertEqual([event.inputTokens, event.cacheWriteInputTokens, event.cacheWrite1hInputTokens], [400_010, 400_000, 400_000])
        let sonnet = ModelPrices(model: "claude-sonnet-4", prices: [.input: rate("3.00"), .output: rate("15.00"), .cacheRead: rate("0.30"),
                                                                      .cacheWrite: rate("3.75"), .cacheWrite1h: rate("6.00")])
        XCTAssertEqual(charge(event, book([sonnet])), 2_401_530_000)
        // Half and half: 200,000 × 3.75 + 200,000 × 6.00 per 1M = 0.75 + 1.2, plus 0.00153.
        var mixed = event
        mixed.cacheWrite1hInputTokens = 200_000
        XCTAssertEqual(charge(mixed, book([sonnet])), 1_951_530_000)
        // A book without a 1-hour price bills every write at its cache-write price (its choice).
        let older = ModelPrices(model: "claude-sonnet-4", prices: [.input: rate("3.00"), .output: rate("15.00"), .cacheWrite: rate("3.75")])
        XCTAssertEqual(charge(event, book([older])), 1_501_530_000)
    }

    /// Bedrock Converse reports the split in `cacheDetails`, 1-hour entries first.
    func testBedrockCacheDetailsGiveTheOneHourWrites() throws {
        let usage = #"{"inputTokens":40,"outputTokens":120,"totalTokens":2660,"cacheReadInputTokens":2000,"cacheWriteInputTokens":500,"cacheDetails":[{"ttl":"1h","inputTokens":300},{"ttl":"5m","inputTokens":200}]}"#
        guard case .success(let value) = JSONValue.parse(Array(usage.utf8)) else { return XCTFail() }
        XCTAssertEqual(try ProviderUsageMapper.map(.bedrock, usage: value).get(),
                       TokenCounts(input: 2540, output: 120, cacheRead: 2000, cacheWrite: 500, cacheWrite1h: 300))
        let wrong = usage.replacingOccurrences(of: #""inputTokens":300"#, with: #""inputTokens":900"#)
        guard case .success(let bad) = JSONValue.parse(Array(wrong.utf8)) else { return XCTFail() }
        guard case .failure(let error) = ProviderUsageMapper.map(.bedrock, usage: bad) else { return XCTFail("900 1-hour writes of 500") }
        XCTAssertTrue(error.description.contains("1-hour cache writes exceed"), error.description)
    }

    /// An event without the split encodes and hashes as it always did (stored dedup hashes stay valid).
    func testEventsWithoutTheSplitKeepTheirEncodingAndHash() {
        let event = UsageEvent(id: "e", source: "s", subject: "c", time: EventTime("2026-03-01T12:00:00Z")!, model: "m",
                               inputTokens: 10, outputTokens: 5, cacheWriteInputTokens: 4)
        XCTAssertFalse(String(decoding: EventEncoder.encode(event), as: UTF8.self).contains("1h"))
        var split = event
        split.cacheWrite1hInputTokens = 4
        XCTAssertNotEqual(ContentHash.of(split), ContentHash.of(event), "the split is part of the content")
    }

    /// `tally pricing rate-unpriced` sends an unpriced event again from its stored canonical JSON:
    /// the copy must have the original's content hash, or the aggregator would record a conflict.
    func testAStoredEventSentAgainKeepsItsContentHash() throws {
        let original = #"{ "type":"llm.usage","specversion":"1.0","id":"e1","source":"app","subject":"c1","time":"2026-03-01T13:30:00.5+01:30","traceparent":"00-ab-01","myext":{"k":[1,2]},"data":{"model":"m","input_tokens":100,"output_tokens":5,"cache_write_input_tokens":40,"cache_write_1h_input_tokens":10,"properties":{"team":"search","empty":""}}}"#
        guard case .success(.usage(let event)) = EventDecoder.decode(Array(original.utf8)) else { return XCTFail("not a usage event") }
        guard case .success(.usage(let copy)) = EventDecoder.decode(EventEncoder.encode(event)) else { return XCTFail("the copy does not decode") }
        XCTAssertEqual(ContentHash.of(copy), ContentHash.of(event))
        XCTAssertEqual(copy, event)
    }

    /// gemini-2.5-pro: 1.25 / 10.00, and above 200,000 input tokens the whole request at 2.50 / 15.00.
    /// 250,000 input and 1,000 output: 250,000 × 2.50 + 1,000 × 15.00 per 1M = 0.625 + 0.015 = 0.64
    /// (not 0.3225 at the base rates). At exactly 200,000 the base rates apply: 0.25 + 0.01 = 0.26.
    func testContextTiersPriceTheWholeRequest() {
        let gemini = ModelPrices(model: "gemini-2.5-pro", prices: [.input: rate("1.25"), .output: rate("10.00")],
                                 contextTiers: [ContextTier(aboveInputTokens: 200_000, prices: [.input: rate("2.50"), .output: rate("15.00")])])
        func event(_ input: Int64) -> UsageEvent {
            UsageEvent(id: "e\(input)", source: "s", subject: "c", time: EventTime("2026-03-01T12:00:00Z")!, model: "gemini-2.5-pro",
                       inputTokens: input, outputTokens: 1_000)
        }
        XCTAssertEqual(charge(event(250_000), book([gemini])), 640_000_000)
        XCTAssertEqual(charge(event(200_000), book([gemini])), 260_000_000)
        // Both in one period: each tier keeps its own cumulative quantity and price item.
        var state = RatingState()
        let records = [event(250_000), event(200_000)].enumerated().map { RaterRecord.usage(PositionedEvent(event: $1, position: LogPosition(partition: 0, offset: Int64($0)))) }
        _ = RatingEngine(catalog: book([gemini])).apply(records, to: &state)
        XCTAssertEqual(state.charges.keys.map(\.item.contextAbove).sorted(), [0, 0, 200_000, 200_000])
        XCTAssertEqual(state.charges.values.reduce(0) { $0 + $1.amountNanos }, 900_000_000)
    }

    /// Context tiers round-trip through the price book document and its canonical JSON.
    func testContextTiersParseAndRoundTrip() throws {
        let yaml = """
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            models:
              - model: gemini-2.5-pro
                input: "1.25"
                output: "10.00"
                cache_write_1h: "2.50"
                context_tiers:
                  - { above_input_tokens: 200000, input: "2.50", output: "15.00" }
            """
        let parsed = try PriceBookDocument.parse(yaml)
        XCTAssertEqual(parsed.models[0].contextTiers, [ContextTier(aboveInputTokens: 200_000, prices: [.input: rate("2.50"), .output: rate("15.00")])])
        XCTAssertEqual(parsed.models[0].prices[.cacheWrite1h], rate("2.50"))
        XCTAssertEqual(try PriceBookDocument.parse(PriceBookDocument.canonicalJSON(parsed)).models, parsed.models)
        XCTAssertThrowsError(try PriceBookDocument.parse(yaml.replacingOccurrences(of: "above_input_tokens: 200000, ", with: ""))) {
            XCTAssertTrue("\($0)".contains("models[0].context_tiers[0].above_input_tokens"), "\($0)")
        }
    }

    /// The example price book prices dated snapshots at their own list prices.
    func testTheExamplePriceBookPricesDatedModelsRight() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("examples/pricing/list-prices.yaml"), encoding: .utf8)
        let book = try PriceBookDocument.parse(text)
        XCTAssertEqual(book.prices(for: "gpt-4o-2024-05-13")?.prices[.input], rate("5.00"))
        XCTAssertEqual(book.prices(for: "gpt-4o-2024-05-13")?.prices[.output], rate("15.00"))
        XCTAssertEqual(book.prices(for: "gpt-4o-2024-08-06")?.prices[.input], rate("2.50"))
        XCTAssertNil(book.prices(for: "gpt-4o-2025-01-01"), "an unknown snapshot stays unpriced, not billed at the family's price")
        XCTAssertNil(book.prices(for: "claude-sonnet-4-5-20250929"), "Sonnet 4.5 (other long-context prices) is not Sonnet 4")
        XCTAssertEqual(book.prices(for: "claude-sonnet-4-20250514")?.prices[.cacheWrite1h], rate("6.00"))
    }

    /// Field names with a context threshold, and the ones that only look like it.
    func testLiteLLMContextTierFieldNames() {
        XCTAssertTrue(PriceBookDocument.contextTier(of: "input_cost_per_token_above_200k_tokens") == ("input_cost_per_token", 200_000))
        XCTAssertTrue(PriceBookDocument.contextTier(of: "cache_creation_input_token_cost_above_1hr_above_200k_tokens")
                      == ("cache_creation_input_token_cost_above_1hr", 200_000))
        XCTAssertTrue(PriceBookDocument.contextTier(of: "input_cost_per_token_above_200k_tokens_batches") == ("input_cost_per_token_above_200k_tokens_batches", 0))
        XCTAssertTrue(PriceBookDocument.contextTier(of: "input_cost_per_video_per_second_above_8s_interval") == ("input_cost_per_video_per_second_above_8s_interval", 0))
    }

    /// Prices finer than 10^-15 per token, context tiers and 1-hour writes are kept; a model whose
    /// price cannot be read is skipped with its reason, and the import goes on.
    func testLiteLLMImportKeepsEveryPriceAndSaysWhatItSkips() throws {
        let litellm = """
            {
              "vertex/gemini-2.5-pro": {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
                 "input_cost_per_token_above_200k_tokens": 2.5e-06, "output_cost_per_token_above_200k_tokens": 1.5e-05,
                 "input_cost_per_token_batches": 6.25e-07, "input_cost_per_audio_token": 0},
              "fine": {"input_cost_per_token": 1.1428571428571428e-06, "output_cost_per_token": 2e-06},
              "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
                 "input_cost_per_token_batches": 1.25e-06, "output_cost_per_token_batches": 5e-06,
                 "input_cost_per_token_priority": 4.25e-06, "output_cost_per_token_priority": 1.7e-05, "cache_read_input_token_cost_priority": 2.125e-06,
                 "input_cost_per_audio_token_batches": 1e-06},
              "gpt-5": {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
                 "input_cost_per_token_above_272k_tokens": 2.5e-06, "input_cost_per_token_flex": 6.25e-07,
                 "input_cost_per_token_above_272k_tokens_flex": 1.25e-06},
              "claude-sonnet-4": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05, "cache_creation_input_token_cost": 3.75e-06,
                 "cache_creation_input_token_cost_above_1hr": 6e-06},
              "broken": {"input_cost_per_token": "free", "output_cost_per_token": 1e-06},
              "too-fine": {"input_cost_per_token": 1e-25, "output_cost_per_token": 1e-06}
            }
            """
        let imported = try PriceBookDocument.importLiteLLM(litellm, name: "default", effectiveFrom: EventTime("2026-01-01T00:00:00Z")!, currency: Self.usd)
        XCTAssertEqual(imported.book.models.map(\.model), ["claude-sonnet-4", "fine", "gpt-4o", "gpt-5", "vertex/gemini-2.5-pro"])
        XCTAssertEqual(imported.skipped.map(\.model), ["broken", "too-fine"])
        XCTAssertTrue(imported.skipped.allSatisfy { $0.reason.contains("input_cost_per_token is not an exact non-negative price") }, "\(imported.skipped)")
        XCTAssertEqual(imported.unmapped.map(\.model), ["gpt-4o", "vertex/gemini-2.5-pro"])
        XCTAssertEqual(imported.unmapped.map(\.reason), ["not billed by token: input_cost_per_audio_token_batches",
                                                         "rule batch left out: its batches prices above 200000 input tokens do not cover the model's token types there"], "zero costs are not listed")
        // Batch and service-tier costs become price rules on the batch and service_tier properties.
        let gpt4o = try XCTUnwrap(imported.book.models.first { $0.model == "gpt-4o" })
        XCTAssertEqual(gpt4o.rules.map(\.name), ["batch", "priority"])
        XCTAssertEqual(gpt4o.rules[0].conditions, [PriceCondition(dimension: "batch", values: ["true"])])
        XCTAssertEqual(gpt4o.rules[0].prices.prices, [.input: rate("1.25"), .output: rate("5.00"), .cacheRead: rate("1.25")],
                       "the batch rule names no cached price: the model's stays")
        XCTAssertEqual(gpt4o.rules[1].prices.prices, [.input: rate("4.25"), .output: rate("17.00"), .cacheRead: rate("2.125")])
        let gpt5 = try XCTUnwrap(imported.book.models.first { $0.model == "gpt-5" })
        XCTAssertEqual(gpt5.rules.map(\.name), ["flex"])
        XCTAssertEqual(gpt5.rules[0].prices.contextTiers, [ContextTier(aboveInputTokens: 272_000, prices: [.input: rate("1.25")])])
        XCTAssertEqual(try PriceBookDocument.parse(PriceBookDocument.canonicalJSON(imported.book)).models, imported.book.models,
                       "the imported rules round-trip through the stored form")
        let byName = Dictionary(uniqueKeysWithValues: imported.book.models.map { ($0.model, $0) })
        XCTAssertEqual(byName["fine"]?.prices[.input], rate("1.1428571428571428"))
        XCTAssertEqual(byName["claude-sonnet-4"]?.prices[.cacheWrite1h], rate("6.00"))
        let gemini = try XCTUnwrap(byName["vertex/gemini-2.5-pro"])
        XCTAssertEqual(gemini.contextTiers, [ContextTier(aboveInputTokens: 200_000, prices: [.input: rate("2.50"), .output: rate("15.00")])])
        // Kept to all its digits: a femto-unit rate could not hold 1.1428571428571428e-06 at all.
        let event = UsageEvent(id: "e", source: "s", subject: "c", time: EventTime("2026-03-01T12:00:00Z")!, model: "fine",
                               inputTokens: 7_000_000, outputTokens: 0)
        XCTAssertEqual(charge(event, PriceCatalog(books: [imported.book])), 8_000_000_000,
                       "7M × 1.1428571428571428e-06 = 7.9999999999999996, rounded half up to the nano-unit")
    }
}
