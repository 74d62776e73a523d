import TallyCore
import XCTest

/// Real-shaped usage objects of each provider, mapped to canonical counts.
final class ProviderUsageTests: XCTestCase {
    func map(_ provider: UsageProvider, _ json: String) -> Result<TokenCounts, EventDecodingError> {
        ProviderUsageMapper.map(provider, usage: try! JSONValue.parse(Array(json.utf8)).get())
    }

    func testOpenAIChatCompletionsIncludeCachedAndReasoning() throws {
        let usage = #"{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":192,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#
        XCTAssertEqual(try map(.openai, usage).get(), TokenCounts(input: 2006, output: 300, cacheRead: 1920, reasoning: 192))
    }

    func testOpenAIResponses() throws {
        let usage = #"{"input_tokens":328,"input_tokens_details":{"cached_tokens":0},"output_tokens":52,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":380}"#
        XCTAssertEqual(try map(.openaiResponses, usage).get(), TokenCounts(input: 328, output: 52))
    }

    func testAnthropicInputExcludesCacheReadsAndWrites() throws {
        let usage = #"{"input_tokens":21,"cache_creation_input_tokens":188086,"cache_read_input_tokens":5000,"output_tokens":393,"service_tier":"standard"}"#
        var expected = TokenCounts(input: 21 + 188_086 + 5000, output: 393, cacheRead: 5000, cacheWrite: 188_086)
        expected.serviceTier = "standard"
        XCTAssertEqual(try map(.anthropic, usage).get(), expected)
    }

    /// The service tier becomes the `service_tier` property (and Anthropic's batch tier `batch`):
    /// from Anthropic's usage object, or the endpoint's `service_tier` and `batch` fields.
    func testProviderEventsCarryTheServiceTier() throws {
        func properties(_ provider: UsageProvider, _ extra: String, usage: String) throws -> [String: String] {
            let body = #"{"id":"e1","customer":"acme","model":"m","time":"2026-03-01T00:00:00Z","usage":\#(usage)\#(extra)}"#
            let encoded = try ProviderEventBuilder.build(provider, body: Array(body.utf8)).get()
            guard case .usage(let event) = try EventDecoder.decode(encoded).get() else { throw ConfigError(line: 0, path: "", message: "not a usage event") }
            return event.properties
        }
        let anthropic = #"{"input_tokens":10,"output_tokens":5,"service_tier":"batch"}"#
        XCTAssertEqual(try properties(.anthropic, "", usage: anthropic), ["status": "success", "service_tier": "batch", "batch": "true"])
        let openai = #"{"prompt_tokens":10,"completion_tokens":5}"#
        XCTAssertEqual(try properties(.openai, #","service_tier":"priority""#, usage: openai), ["status": "success", "service_tier": "priority"])
        XCTAssertEqual(try properties(.openai, #","batch":true"#, usage: openai), ["status": "success", "batch": "true"])
        XCTAssertEqual(try properties(.openai, "", usage: openai), ["status": "success"])
        let wrong = ProviderEventBuilder.build(.openai, body: Array(#"{"id":"e1","customer":"acme","model":"m","time":"2026-03-01T00:00:00Z","usage":\#(openai),"batch":"yes"}"#.utf8))
        guard case .failure(let error) = wrong else { return XCTFail("a batch that is not a boolean is refused") }
        XCTAssertEqual(error.violations.map(\.path), ["batch"])
        let badTier = ProviderEventBuilder.build(.openai, body: Array(#"{"id":"e1","customer":"acme","model":"m","time":"2026-03-01T00:00:00Z","usage":\#(openai),"service_tier":"Pri ority"}"#.utf8))
        guard case .failure(let tierError) = badTier else { return XCTFail("a tier outside a-z, 0-9, _ and - is refused") }
        XCTAssertEqual(tierError.violations.map(\.path), ["service_tier"])
    }

    /// Token windows split by the call's status, bounded: a caller's own text is `other`.
    func testTheWindowsStatusIsACallStatusOrOther() {
        func status(_ properties: [String: String]) -> String {
            UsageDimensions(UsageEvent(id: "e", source: "s", subject: "c", time: EventTime("2026-03-01T00:00:00Z")!, model: "m",
                                       inputTokens: 1, outputTokens: 1, properties: properties)).status
        }
        XCTAssertEqual(status([:]), "")
        XCTAssertEqual(["success", "retry", "error", "cancelled"].map { status(["status": $0]) }, ["success", "retry", "error", "cancelled"])
        XCTAssertEqual(status(["status": String(repeating: "x", count: 1_024)]), "other")
        XCTAssertEqual(status(["status": "Error"]), "other")
    }

    func testGeminiCandidatesExcludeThoughts() throws {
        let usage = #"{"promptTokenCount":1024,"candidatesTokenCount":200,"thoughtsTokenCount":800,"cachedContentTokenCount":512,"totalTokenCount":2024,"promptTokensDetails":[{"modality":"TEXT","tokenCount":1024}]}"#
        XCTAssertEqual(try map(.gemini, usage).get(), TokenCounts(input: 1024, output: 1000, cacheRead: 512, reasoning: 800))
    }

    func testBedrockInputExcludesCache() throws {
        let usage = #"{"inputTokens":40,"outputTokens":120,"totalTokens":2660,"cacheReadInputTokens":2000,"cacheWriteInputTokens":500}"#
        XCTAssertEqual(try map(.bedrock, usage).get(), TokenCounts(input: 2540, output: 120, cacheRead: 2000, cacheWrite: 500))
    }

    /// Anthropic's server tools (web search, web fetch) are standard meters; zero is left out.
    func testAnthropicServerToolUseBecomesStandardMeters() throws {
        let usage = #"{"input_tokens":105,"output_tokens":512,"server_tool_use":{"web_search_requests":3,"web_fetch_requests":0}}"#
        var expected = TokenCounts(input: 105, output: 512)
        expected.meters = ["web_search_requests": 3]
        XCTAssertEqual(try map(.anthropic, usage).get(), expected)
        XCTAssertEqual(map(.anthropic, #"{"input_tokens":1,"output_tokens":1,"server_tool_use":{"web_fetch_requests":1.5}}"#),
                       .failure(.invalid([FieldViolation("usage.server_tool_use.web_fetch_requests", "must be an integer ≥ 0")])))
        // Another provider's object with the same member is not read for it.
        XCTAssertEqual(try map(.openai, #"{"prompt_tokens":1,"completion_tokens":1,"server_tool_use":{"web_search_requests":3}}"#).get().meters, [:])
    }

    /// The provider endpoint's event: standard meters, and the call's status (success unless said) and attempt.
    func testProviderEventsCarryMetersStatusAndAttempt() throws {
        func build(_ extra: String) -> Result<UsageEvent, EventDecodingError> {
            let body = #"{"id":"p1","customer":"acme","model":"claude-sonnet-4-5","time":"2026-03-01T12:00:00Z","usage":{"input_tokens":1,"output_tokens":1,"server_tool_use":{"web_search_requests":2}}"# + extra + "}"
            return ProviderEventBuilder.build(.anthropic, body: Array(body.utf8)).flatMap { bytes in
                EventDecoder.decode(bytes).flatMap { event in
                    guard case .usage(let usage) = event else { return .failure(.invalid([])) }
                    return .success(usage)
                }
            }
        }
        let plain = try build("").get()
        XCTAssertEqual(plain.meters, ["web_search_requests": 2])
        XCTAssertEqual(plain.properties, ["status": "success"])
        XCTAssertEqual(try build(#","status":"error","attempt":3"#).get().properties, ["status": "error", "attempt": "3"])
        XCTAssertEqual(try build(#","attempt":2"#).get().properties, ["status": "retry", "attempt": "2"], "as the gateway would say")
        XCTAssertEqual(try build(#","properties":{"status":"draft"}"#).get().properties, ["status": "draft"], "the caller's own property is kept")
        func refused(_ extra: String) -> [String] {
            if case .failure(let error) = build(extra) { error.violations.map(\.path) } else { [] }
        }
        XCTAssertEqual(refused(#","status":"failed""#), ["status"])
        XCTAssertEqual(refused(#","attempt":0"#), ["attempt"])
        XCTAssertEqual(refused(#","status":"error","properties":{"status":"draft"}"#), ["properties.status"])
    }

    /// How a call ended, from what the gateway saw.
    func testCallStatusFromWhatTheGatewaySaw() {
        XCTAssertEqual(CallStatus(upstreamStatus: 200, errorReported: false, brokeOff: false, callerLeft: false, attempt: nil), .success)
        XCTAssertEqual(CallStatus(upstreamStatus: 200, errorReported: false, brokeOff: false, callerLeft: false, attempt: 1), .success)
        XCTAssertEqual(CallStatus(upstreamStatus: 200, errorReported: false, brokeOff: false, callerLeft: false, attempt: 2), .retry)
        XCTAssertEqual(CallStatus(upstreamStatus: 529, errorReported: false, brokeOff: false, callerLeft: false, attempt: 2), .error)
        XCTAssertEqual(CallStatus(upstreamStatus: 200, errorReported: true, brokeOff: false, callerLeft: false, attempt: nil), .error)
        XCTAssertEqual(CallStatus(upstreamStatus: 200, errorReported: false, brokeOff: true, callerLeft: false, attempt: nil), .cancelled)
        XCTAssertEqual(CallStatus(upstreamStatus: 200, errorReported: false, brokeOff: false, callerLeft: true, attempt: 3), .cancelled)
    }

    func testMissingAndInvalidCountsNameTheField() {
        XCTAssertEqual(map(.openai, #"{"completion_tokens":3}"#), .failure(.invalid([FieldViolation("usage.prompt_tokens", "is required")])))
        XCTAssertEqual(map(.anthropic, #"{"input_tokens":-1,"output_tokens":2}"#), .failure(.invalid([FieldViolation("usage.input_tokens", "must be an integer ≥ 0")])))
        XCTAssertEqual(map(.gemini, #"[]"#), .failure(.invalid([FieldViolation("usage", "must be the provider's usage object")])))
        XCTAssertEqual(map(.openai, #"{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":9}}"#),
                       .failure(.invalid([FieldViolation("usage", "inconsistent counts: cached tokens exceed input or reasoning exceeds output")])))
    }
}
