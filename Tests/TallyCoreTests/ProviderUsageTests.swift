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
        XCTAssertEqual(try map(.anthropic, usage).get(), TokenCounts(input: 21 + 188_086 + 5000, output: 393, cacheRead: 5000, cacheWrite: 188_086))
    }

    func testGeminiCandidatesExcludeThoughts() throws {
        let usage = #"{"promptTokenCount":1024,"candidatesTokenCount":200,"thoughtsTokenCount":800,"cachedContentTokenCount":512,"totalTokenCount":2024,"promptTokensDetails":[{"modality":"TEXT","tokenCount":1024}]}"#
        XCTAssertEqual(try map(.gemini, usage).get(), TokenCounts(input: 1024, output: 1000, cacheRead: 512, reasoning: 800))
    }

    func testBedrockInputExcludesCache() throws {
        let usage = #"{"inputTokens":40,"outputTokens":120,"totalTokens":2660,"cacheReadInputTokens":2000,"cacheWriteInputTokens":500}"#
        XCTAssertEqual(try map(.bedrock, usage).get(), TokenCounts(input: 2540, output: 120, cacheRead: 2000, cacheWrite: 500))
    }

    func testMissingAndInvalidCountsNameTheField() {
        XCTAssertEqual(map(.openai, #"{"completion_tokens":3}"#), .failure(.invalid([FieldViolation("usage.prompt_tokens", "is required")])))
        XCTAssertEqual(map(.anthropic, #"{"input_tokens":-1,"output_tokens":2}"#), .failure(.invalid([FieldViolation("usage.input_tokens", "must be an integer ≥ 0")])))
        XCTAssertEqual(map(.gemini, #"[]"#), .failure(.invalid([FieldViolation("usage", "must be the provider's usage object")])))
        XCTAssertEqual(map(.openai, #"{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":9}}"#),
                       .failure(.invalid([FieldViolation("usage", "inconsistent counts: cached tokens exceed input or reasoning exceeds output")])))
    }
}
