import TallyCore
import XCTest

/// The gateway's pure parts: reading requests, reading usage out of responses as they
/// pass, and holding credit for calls in flight.
final class GatewayTests: XCTestCase {
    func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    func testRequestsGiveModelStreamAndOutputBound() throws {
        let chat = try GatewayRequest.parse(.chatCompletions, body: bytes(#"{"model":"gpt-4o","temperature":0.7,"max_completion_tokens":300,"messages":[]}"#)).get()
        XCTAssertEqual(chat.model, "gpt-4o")
        XCTAssertFalse(chat.stream)
        XCTAssertEqual(chat.maxOutputTokens, 300)
        XCTAssertEqual(chat.upstreamBody, bytes(#"{"model":"gpt-4o","temperature":0.7,"max_completion_tokens":300,"messages":[]}"#))
        XCTAssertFalse(chat.addedUsageChunk)
        let responses = try GatewayRequest.parse(.responses, body: bytes(#"{"model":"o3","input":"hi","max_output_tokens":50,"stream":true}"#)).get()
        XCTAssertEqual(responses.maxOutputTokens, 50)
        XCTAssertTrue(responses.stream)
        XCTAssertFalse(responses.addedUsageChunk, "the responses API always reports usage")
        let unbounded = try GatewayRequest.parse(.messages, body: bytes(#"{"model":"claude","messages":[]}"#)).get()
        XCTAssertNil(unbounded.maxOutputTokens)
        XCTAssertEqual(unbounded.inputTokenEstimate, Int64((#"{"model":"claude","messages":[]}"#.utf8.count + 3) / 4))
    }

    func testAStreamedChatCompletionAsksForUsageWithoutChangingTheCallersBytes() throws {
        let body = #" {"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
        let call = try GatewayRequest.parse(.chatCompletions, body: bytes(body)).get()
        XCTAssertTrue(call.addedUsageChunk)
        XCTAssertEqual(String(decoding: call.upstreamBody, as: UTF8.self),
                       #" {"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
        let asked = try GatewayRequest.parse(.chatCompletions, body: bytes(#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#)).get()
        XCTAssertFalse(asked.addedUsageChunk)
        XCTAssertEqual(asked.upstreamBody, bytes(#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#))
    }

    func testRequestsThatCannotBeMeteredAreRefusedWithTheField() {
        guard case .failure(let noModel) = GatewayRequest.parse(.chatCompletions, body: bytes(#"{"messages":[]}"#)) else { return XCTFail() }
        XCTAssertEqual(noModel.violations.map(\.path), ["model"])
        guard case .failure(let refusesUsage) = GatewayRequest.parse(.chatCompletions,
            body: bytes(#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#)) else { return XCTFail() }
        XCTAssertEqual(refusesUsage.violations.map(\.path), ["stream_options.include_usage"])
        guard case .failure(.malformedJSON) = GatewayRequest.parse(.messages, body: bytes("{nope")) else { return XCTFail() }
    }

    /// Feeds `stream` to a scanner in pieces of `size` bytes; returns what it forwards.
    func pass(_ stream: String, api: GatewayAPI, removeUsageChunk: Bool = false, size: Int) -> (String, ResponseUsageScanner) {
        var scanner = ResponseUsageScanner(api: api, isEventStream: true, removeUsageChunk: removeUsageChunk)
        var out: [UInt8] = []
        let all = bytes(stream)
        var index = 0
        while index < all.count {
            out += scanner.feed(Array(all[index..<min(all.count, index + size)]))
            index += size
        }
        out += scanner.finish()
        return (String(decoding: out, as: UTF8.self), scanner)
    }

    func testOpenAIChatStreamUsageIsReadAndTheAddedChunkTakenOut() throws {
        let chunk = #"data: {"id":"c1","model":"gpt-4o-2024","choices":[{"delta":{"content":"hi"}}],"usage":null}"#
        let usage = #"data: {"id":"c1","model":"gpt-4o-2024","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}}"#
        let stream = chunk + "\n\n" + chunk + "\n\n" + usage + "\n\n" + "data: [DONE]\n\n"
        for size in [1, 7, 64, 10_000] {
            let (kept, keptScanner) = pass(stream, api: .chatCompletions, size: size)
            XCTAssertEqual(kept, stream, "a caller that asked for usage gets the stream as it came")
            XCTAssertEqual(try keptScanner.counts()?.get(), TokenCounts(input: 12, output: 7, cacheRead: 2))
            let (removed, scanner) = pass(stream, api: .chatCompletions, removeUsageChunk: true, size: size)
            let plain = #"data: {"id":"c1","model":"gpt-4o-2024","choices":[{"delta":{"content":"hi"}}]}"#
            XCTAssertEqual(removed, plain + "\n\n" + plain + "\n\n" + "data: [DONE]\n\n")
            XCTAssertEqual(try scanner.counts()?.get(), TokenCounts(input: 12, output: 7, cacheRead: 2))
            XCTAssertEqual(scanner.model, "gpt-4o-2024")
            XCTAssertEqual(scanner.responseID, "c1")
        }
    }

    func testAnthropicStreamUsageComesFromStartAndLastDelta() throws {
        let stream = """
            event: message_start\r
            data: {"type":"message_start","message":{"id":"m1","model":"claude-x","usage":{"input_tokens":20,"cache_read_input_tokens":5,"cache_creation_input_tokens":3,"output_tokens":1}}}\r
            \r
            event: content_block_delta
            data: {"type":"content_block_delta","delta":{"text":"a"}}

            event: message_delta
            data: {"type":"message_delta","usage":{"output_tokens":9}}

            event: message_delta
            data: {"type":"message_delta","usage":{"output_tokens":15}}


            """
        let (out, scanner) = pass(stream, api: .messages, size: 5)
        XCTAssertEqual(out, stream)
        // Anthropic's input excludes cached tokens; Tally's includes them.
        XCTAssertEqual(try scanner.counts()?.get(), TokenCounts(input: 28, output: 15, cacheRead: 5, cacheWrite: 3))
        XCTAssertFalse(scanner.sawErrorEvent)
        let (_, broken) = pass(stream + "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n", api: .messages, size: 100)
        XCTAssertTrue(broken.sawErrorEvent)
    }

    /// Issue #20: a streamed Anthropic call whose last message_delta reports the input and cache
    /// counts as null (unchanged) is metered from message_start's: input 25 + 100 cache reads = 125,
    /// cache read 100, output 15 (before, "usage.input_tokens: is required" left it unmetered).
    func testANullCountInTheLastDeltaMeansUnchanged() throws {
        let stream = """
            event: message_start
            data: {"type":"message_start","message":{"id":"m1","model":"claude-x","usage":{"input_tokens":25,"cache_read_input_tokens":100,"cache_creation_input_tokens":0,"output_tokens":1}}}

            event: message_delta
            data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":null,"cache_read_input_tokens":null,"cache_creation_input_tokens":null,"output_tokens":15}}


            """
        let (_, scanner) = pass(stream, api: .messages, size: 7)
        XCTAssertEqual(try scanner.counts()?.get(), TokenCounts(input: 125, output: 15, cacheRead: 100))
    }

    /// Issue #20: a customer with `--overage stop` and 0.01 of credit calls a model no price book
    /// prices, ~5,000 tokens a call. Held at the default 75.00 per 1M tokens (5,000 × 75 / 1M =
    /// 0.375): the first call is admitted (credit is left) and its hold leaves −0.365, so the second
    /// is refused; under `.refuse` every call is. Never free.
    func testUnpricedModelsAreNeverFreeUnderAStopPolicy() {
        let expected = TokenCounts(input: 4_000, output: 1_000)
        XCTAssertNil(CallChargeEstimate.nanos(expected, model: "no-price-model", customer: BillingProfile(customerID: "c"),
                                              catalog: PriceCatalog(books: []), at: EventTime("2026-03-01T00:00:00Z")!))
        let policy = UnpricedModelPolicy.hold(nanosPerMillionTokens: 75_000_000_000)
        XCTAssertEqual(policy.holdNanos(expected), 375_000_000)
        var credit = CreditReservations()
        let snapshot = WalletSnapshot(balanceNanos: 10_000_000, raterNextOffsets: [:])
        guard case .admitted = credit.admit("c", estimateNanos: policy.holdNanos(expected)!, snapshot: snapshot, policy: .stop) else {
            return XCTFail("0.01 is left: the first call goes")
        }
        XCTAssertEqual(credit.admit("c", estimateNanos: policy.holdNanos(expected)!, snapshot: snapshot, policy: .stop),
                       .refused(availableNanos: -365_000_000))
        XCTAssertNil(UnpricedModelPolicy.refuse.holdNanos(expected))
        // Extreme counts saturate; one token at the smallest price still holds one nano-unit.
        XCTAssertEqual(policy.holdNanos(TokenCounts(input: Int64.max, output: Int64.max)), Money.maxNanos)
        XCTAssertEqual(UnpricedModelPolicy.hold(nanosPerMillionTokens: 1).holdNanos(TokenCounts(input: 1, output: 0)), 1)
    }

    /// Gateway errors in each vendor's own shape, so their SDKs show the message; the problem
    /// details stay beside it.
    func testGatewayErrorsTakeEachVendorsShape() throws {
        let problem = Array(#"{"type":"about:blank","title":"insufficient credit","status":402}"#.utf8)
        let openAI = try JSONValue.parse(GatewayErrorBody.render(.openai, status: 402, message: "not enough credit", code: "insufficient_credit", problem: problem)).get()
        XCTAssertEqual(openAI["error"]?["message"]?.string, "not enough credit")
        XCTAssertEqual(openAI["error"]?["type"]?.string, "insufficient_quota")
        XCTAssertEqual(openAI["error"]?["code"]?.string, "insufficient_credit")
        XCTAssertEqual(openAI["error"]?["param"], .null)
        XCTAssertEqual(openAI["problem"]?["title"]?.string, "insufficient credit")
        let anthropic = try JSONValue.parse(GatewayErrorBody.render(.anthropic, status: 402, message: "not enough credit", code: "x", problem: problem)).get()
        XCTAssertEqual(anthropic["type"]?.string, "error")
        XCTAssertEqual(anthropic["error"]?["type"]?.string, "billing_error")
        XCTAssertEqual(anthropic["error"]?["message"]?.string, "not enough credit")
        XCTAssertEqual(GatewayErrorBody.errorType(.anthropic, status: 401), "authentication_error")
        XCTAssertEqual(GatewayErrorBody.errorType(.anthropic, status: 413), "request_too_large")
        XCTAssertEqual(GatewayErrorBody.errorType(.anthropic, status: 400), "invalid_request_error")
        XCTAssertEqual(GatewayErrorBody.errorType(.openai, status: 502), "server_error")
    }

    /// Issue #20: `max_tokens` 9,007,199,254,740,991 from a customer whose policy can refuse: the
    /// estimate saturates and the call is refused, nothing traps.
    func testTheLargestMaxTokensIsRefusedNotATrap() throws {
        let request = try GatewayRequest.parse(.chatCompletions, body: bytes(#"{"model":"gpt-4o","max_tokens":9007199254740991,"messages":[]}"#)).get()
        let book = PriceBook(name: "default", version: 1, effectiveFrom: EventTime("2026-01-01T00:00:00Z")!, currency: Currency("USD")!, models: [
            ModelPrices(model: "gpt-4o", prices: [.input: .perUnit(TokenRate.parse("2.50", perTokens: .perMillion)!),
                                                  .output: .perUnit(TokenRate.parse("10.00", perTokens: .perMillion)!)])])
        let expected = TokenCounts(input: request.inputTokenEstimate, output: try XCTUnwrap(request.maxOutputTokens))
        let estimate = try XCTUnwrap(CallChargeEstimate.nanos(expected, model: "gpt-4o", customer: BillingProfile(customerID: "c"),
                                                              catalog: PriceCatalog(books: [book]), at: EventTime("2026-03-01T00:00:00Z")!))
        XCTAssertEqual(estimate, Money.maxNanos, "2^53 − 1 output tokens at 10.00 per 1M are 90 billion: past an amount's range")
        var credit = CreditReservations()
        let snapshot = WalletSnapshot(balanceNanos: 10_000_000, raterNextOffsets: [:])
        guard case .admitted = credit.admit("c", estimateNanos: estimate, snapshot: snapshot, policy: .stop) else { return XCTFail("the first call is admitted") }
        // 10,000,000 − 9,223,372,036,854,775,807 (the first call's hold).
        XCTAssertEqual(credit.admit("c", estimateNanos: estimate, snapshot: snapshot, policy: .stop), .refused(availableNanos: -9_223_372_036_844_775_807),
                       "the held estimate leaves nothing: refused")
    }

    func testWholeBodiesAndResponsesEvents() throws {
        var whole = ResponseUsageScanner(api: .responses, isEventStream: false, removeUsageChunk: true)
        let body = #"{"id":"r1","model":"o3","usage":{"input_tokens":40,"output_tokens":30,"output_tokens_details":{"reasoning_tokens":20},"input_tokens_details":{"cached_tokens":8}}}"#
        XCTAssertEqual(whole.feed(bytes(String(body.prefix(10)))) + whole.feed(bytes(String(body.dropFirst(10)))), bytes(body))
        XCTAssertEqual(whole.finish(), [])
        XCTAssertEqual(try whole.counts()?.get(), TokenCounts(input: 40, output: 30, cacheRead: 8, reasoning: 20))
        let events = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r2\",\"model\":\"o3\",\"usage\":null}}\n\n"
            + "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r2\",\"model\":\"o3\",\"usage\":{\"input_tokens\":4,\"output_tokens\":3}}}\n\n"
        let (_, streamed) = pass(events, api: .responses, size: 3)
        XCTAssertEqual(try streamed.counts()?.get(), TokenCounts(input: 4, output: 3))
        var none = ResponseUsageScanner(api: .chatCompletions, isEventStream: false, removeUsageChunk: false)
        _ = none.feed(bytes(#"{"error":{"message":"boom"}}"#))
        _ = none.finish()
        XCTAssertNil(none.counts(), "an error without usage meters nothing")
    }

    /// Tool calls and server tools in each API's response, whole and streamed in pieces of any
    /// size: a chat tool call counts once however many deltas it spans, a Responses stream's
    /// output is counted from its last response object only.
    func testToolCallsAndWebSearchesAreCountedFromTheResponse() throws {
        let chatWhole = #"{"id":"c1","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","tool_calls":[{"id":"call_0","type":"function","function":{"name":"a","arguments":"{}"}},{"id":"call_1","type":"function","function":{"name":"b","arguments":"{}"}}]}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#
        var whole = ResponseUsageScanner(api: .chatCompletions, isEventStream: false, removeUsageChunk: false)
        _ = whole.feed(bytes(chatWhole))
        _ = whole.finish()
        XCTAssertEqual(try whole.counts()?.get().meters, ["tool_calls": 2])

        let chatStream = [#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_0","function":{"name":"a","arguments":""}}]}}]}"#,
                          #"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#,
                          #"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#].map { "data: \($0)\n\n" }.joined() + "data: [DONE]\n\n"
        for size in [1, 7, 4096] {
            let (_, streamed) = pass(chatStream, api: .chatCompletions, size: size)
            XCTAssertEqual(try streamed.counts()?.get().meters, ["tool_calls": 1], "chunks of \(size)")
        }
        // LiteLLM, DeepSeek and Qwen repeat a call's id on each delta: still one call per index.
        let repeated = [#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_0","function":{"name":"a","arguments":""}}]}}]}"#,
                        #"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_0","function":{"arguments":"{}"}}]}}]}"#,
                        #"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_1","function":{"name":"b","arguments":"{}"}}]}}]}"#,
                        #"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#].map { "data: \($0)\n\n" }.joined()
        XCTAssertEqual(try pass(repeated, api: .chatCompletions, size: 9).1.counts()?.get().meters, ["tool_calls": 2])
        // A Responses stream that fails on a 200 is the call's error.
        let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"r\",\"status\":\"failed\",\"usage\":{\"input_tokens\":4,\"output_tokens\":0}}}\n\n"
        XCTAssertTrue(pass(failed, api: .responses, size: 6).1.sawErrorEvent)

        let output = #"[{"type":"web_search_call","id":"ws_0"},{"type":"web_search_call","id":"ws_1"},{"type":"function_call","call_id":"c"},{"type":"image_generation_call","id":"ig"},{"type":"file_search_call","id":"fs"},{"type":"code_interpreter_call","id":"ci"},{"type":"message"}]"#
        let responses = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"output\":[],\"usage\":null}}\n\n"
            + "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":\(output),\"usage\":{\"input_tokens\":4,\"output_tokens\":3}}}\n\n"
        let (_, streamedResponses) = pass(responses, api: .responses, size: 5)
        XCTAssertEqual(try streamedResponses.counts()?.get().meters, ["web_search_requests": 2, "tool_calls": 1, "images_generated": 1,
                                                                        "file_search_requests": 1, "code_interpreter_calls": 1])

        let messages = [#"{"type":"message_start","message":{"id":"m","model":"claude-sonnet-4","content":[],"usage":{"input_tokens":10,"output_tokens":1}}}"#,
                        #"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
                        #"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"lookup","input":{}}}"#,
                        #"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9,"server_tool_use":{"web_search_requests":2}}}"#]
            .map { "event: x\ndata: \($0)\n\n" }.joined()
        let (_, streamedMessages) = pass(messages, api: .messages, size: 3)
        XCTAssertEqual(try streamedMessages.counts()?.get().meters, ["tool_calls": 1, "web_search_requests": 2])
        var wholeMessage = ResponseUsageScanner(api: .messages, isEventStream: false, removeUsageChunk: false)
        _ = wholeMessage.feed(bytes(#"{"id":"m","type":"message","content":[{"type":"text","text":"x"},{"type":"tool_use","id":"a"},{"type":"tool_use","id":"b"}],"usage":{"input_tokens":1,"output_tokens":1}}"#))
        _ = wholeMessage.finish()
        XCTAssertEqual(try wholeMessage.counts()?.get().meters, ["tool_calls": 2])
    }

    func testMarginalCeilingsBoundEveryPricingModel() {
        let rate = { (perMillion: String) in TokenRate.parse(perMillion, perTokens: .perMillion)! }
        XCTAssertEqual(PricingModel.perUnit(rate("2")).marginalCeiling(1_000_000), 2_000_000_000)
        XCTAssertEqual(PricingModel.package(size: 1000, priceNanos: 5).marginalCeiling(1500), 10)
        let tiers = [PriceTier(upTo: 1000, rate: rate("10")), PriceTier(upTo: nil, rate: rate("1"))]
        XCTAssertEqual(PricingModel.graduated(tiers).marginalCeiling(1_000_000), 10_000_000_000)
        XCTAssertEqual(PricingModel.volume(tiers).marginalCeiling(0), 0)
        // Whatever came before, more tokens never add more than the ceiling.
        for model in [PricingModel.graduated(tiers), .volume(tiers), .package(size: 1000, priceNanos: 5)] {
            for before in [0, 999, 1000, 5000] as [Int64] {
                XCTAssertLessThanOrEqual(model.charge(before + 700)! - model.charge(before)!, model.marginalCeiling(700), "\(model) after \(before)")
            }
        }
    }

    func testAStopWalletRefusesOnceHoldsUseTheCredit() {
        var credit = CreditReservations()
        let snapshot = WalletSnapshot(balanceNanos: 100, raterNextOffsets: [0: 10])
        guard case .admitted(let first, 100) = credit.admit("c", estimateNanos: 60, snapshot: snapshot, policy: .stop) else { return XCTFail() }
        guard case .admitted(_, 40) = credit.admit("c", estimateNanos: 60, snapshot: snapshot, policy: .stop) else { return XCTFail() }
        XCTAssertEqual(credit.admit("c", estimateNanos: 60, snapshot: snapshot, policy: .stop), .refused(availableNanos: -20))
        XCTAssertEqual(credit.admit("other", estimateNanos: 60, snapshot: WalletSnapshot(balanceNanos: 0, raterNextOffsets: [:]), policy: .stop),
                       .refused(availableNanos: 0))
        // The first call used less than it reserved and its event is at partition 0 offset 12.
        XCTAssertEqual(credit.settle(first, actualNanos: 30), 0)
        credit.published(first, at: LogPosition(partition: 0, offset: 12))
        XCTAssertEqual(credit.available(to: "c", snapshot: snapshot), 100 - 30 - 60)
        // The rater read past it and debited it: the balance holds it now, the hold is gone.
        XCTAssertEqual(credit.available(to: "c", snapshot: WalletSnapshot(balanceNanos: 70, raterNextOffsets: [0: 13])), 70 - 60)
        XCTAssertEqual(credit.holds.count, 1)
        // An overage limit lets the balance go below zero down to it.
        XCTAssertEqual(credit.admit("d", estimateNanos: 50, snapshot: WalletSnapshot(balanceNanos: -40, raterNextOffsets: [:]),
                                    policy: .allow(limitNanos: 50)).isAdmitted, true)
        XCTAssertEqual(credit.admit("d", estimateNanos: 50, snapshot: WalletSnapshot(balanceNanos: -40, raterNextOffsets: [:]),
                                    policy: .allow(limitNanos: 50)).isAdmitted, false)
    }

    /// Property: calls admitted in any order, settled in any order at up to their estimate,
    /// never take a stop wallet further below zero than one estimate.
    func testABurstOvershootsByAtMostOneEstimate() {
        var generator = SeededGenerator(seed: 99)
        for _ in 0..<200 {
            var credit = CreditReservations()
            let balance = Int64.random(in: 0...10_000, using: &generator)
            let snapshot = WalletSnapshot(balanceNanos: balance, raterNextOffsets: [:])
            var maxEstimate: Int64 = 0
            var used: Int64 = 0
            var running: [(id: Int, estimate: Int64)] = []
            for _ in 0..<60 {
                if !running.isEmpty && Bool.random(using: &generator) {
                    let call = running.remove(at: Int.random(in: 0..<running.count, using: &generator))
                    let actual = Int64.random(in: 0...call.estimate, using: &generator)
                    credit.settle(call.id, actualNanos: actual)
                    used += actual
                } else {
                    let estimate = Int64.random(in: 1...800, using: &generator)
                    if case .admitted(let id, _) = credit.admit("c", estimateNanos: estimate, snapshot: snapshot, policy: .stop) {
                        running.append((id, estimate))
                        maxEstimate = max(maxEstimate, estimate)
                    }
                }
            }
            for call in running { used += call.estimate; credit.settle(call.id, actualNanos: call.estimate) }
            XCTAssertGreaterThanOrEqual(balance - used, -maxEstimate)
        }
    }
}

private extension CreditReservations.Admission {
    var isAdmitted: Bool { if case .admitted = self { true } else { false } }
}
