/// The LLM APIs the gateway proxies, each metered from its own usage object.
public enum GatewayAPI: String, Sendable, CaseIterable {
    case chatCompletions = "chat_completions"
    case responses
    case messages

    public enum Vendor: String, Sendable { case openai, anthropic }

    public var vendor: Vendor { self == .messages ? .anthropic : .openai }

    /// The path under the upstream's base URL (and the gateway's own route).
    public var path: String {
        switch self {
        case .chatCompletions: "/v1/chat/completions"
        case .responses: "/v1/responses"
        case .messages: "/v1/messages"
        }
    }

    /// Whose token semantics the usage object follows.
    public var usageProvider: UsageProvider {
        switch self {
        case .chatCompletions: .openai
        case .responses: .openaiResponses
        case .messages: .anthropic
        }
    }
}

/// What the gateway needs from a caller's request before forwarding it.
public struct GatewayRequest: Sendable, Equatable {
    public let model: String
    public let stream: Bool
    /// The most output tokens the call may produce, when the request bounds it.
    public let maxOutputTokens: Int64?
    /// A rough count of input tokens (a token per 4 bytes of the body): an estimate, not a bound.
    public let inputTokenEstimate: Int64
    /// What to send upstream: the caller's body, plus `stream_options.include_usage` on a
    /// streamed chat completion that did not ask for it (usage is otherwise never reported).
    public let upstreamBody: [UInt8]
    /// Tally added `include_usage`: the usage-only chunk and the `"usage":null` members it
    /// brings are taken out of the stream again, so the caller sees what it asked for.
    public let addedUsageChunk: Bool

    /// Reads the few top-level members the gateway needs and skips the rest in place: a request
    /// of tens of megabytes (images, long contexts) costs its own bytes, not a tree of them.
    public static func parse(_ api: GatewayAPI, body: [UInt8]) -> Result<GatewayRequest, EventDecodingError> {
        var model: JSONValue?
        var streamValue: JSONValue?
        var streamOptions: JSONValue?
        var limits: [String: JSONValue] = [:]
        let read: Result<Void, JSONSyntaxError> = body.withUnsafeBufferPointer { buffer in
            var reader = JSONReader(buffer)
            do throws(JSONSyntaxError) {
                guard try reader.peekKind() == .object else {
                    try reader.skipValue()
                    try reader.finish()
                    return .success(())
                }
                var seen = Set<String>()
                try reader.readMembers { (reader: inout JSONReader, key: JSONKey) throws(JSONSyntaxError) in
                    let name = key.string
                    guard seen.insert(name).inserted else { throw reader.error("duplicate key \"\(name)\"") }
                    switch name {
                    case "model": model = try JSONValue.read(&reader, depth: 1)
                    case "stream": streamValue = try JSONValue.read(&reader, depth: 1)
                    case "stream_options": streamOptions = try JSONValue.read(&reader, depth: 1)
                    case "max_completion_tokens", "max_output_tokens", "max_tokens": limits[name] = try JSONValue.read(&reader, depth: 1)
                    default: try reader.skipValue(depth: 1)
                    }
                }
                try reader.finish()
                return .success(())
            } catch {
                return .failure(error)
            }
        }
        if case .failure(let error) = read { return .failure(.malformedJSON(error)) }
        guard body.first(where: { ![0x20, 0x09, 0x0a, 0x0d].contains($0) }) == UInt8(ascii: "{") else {
            return .failure(.invalid([FieldViolation("", "the body must be a JSON object")]))
        }
        guard case .string(let model)? = model, !model.isEmpty else {
            return .failure(.invalid([FieldViolation("model", "is required (a string)")]))
        }
        let stream = streamValue == .bool(true)
        var maxOutput: Int64?
        for key in ["max_completion_tokens", "max_output_tokens", "max_tokens"] {
            if case .integer(.value(let value))? = limits[key], value > 0 { maxOutput = value; break }
        }
        var upstreamBody = body
        var added = false
        if api == .chatCompletions && stream {
            switch streamOptions {
            case nil:
                // Inserted after the opening brace: the caller's bytes stay as they were.
                let brace = body.firstIndex(of: UInt8(ascii: "{"))!
                upstreamBody.insert(contentsOf: Array(#""stream_options":{"include_usage":true},"#.utf8), at: brace + 1)
                added = true
            case .object(let options)? where options["include_usage"] == .bool(true):
                break
            default:
                return .failure(.invalid([FieldViolation("stream_options.include_usage",
                    "the gateway meters a streamed call from its usage chunk: leave stream_options out or set include_usage to true")]))
            }
        }
        return .success(GatewayRequest(model: model, stream: stream, maxOutputTokens: maxOutput,
                                       inputTokenEstimate: Int64((body.count + 3) / 4), upstreamBody: upstreamBody,
                                       addedUsageChunk: added))
    }
}

/// Reads the usage out of an upstream response as it passes through, streamed (server-sent
/// events) or whole, and hands back the bytes to forward.
public struct ResponseUsageScanner: Sendable {
    public let api: GatewayAPI
    public let isEventStream: Bool
    private let removeUsageChunk: Bool
    private var pending: [UInt8] = []
    /// A whole (non-streamed) body, kept to read its usage at the end.
    private var whole: [UInt8] = []
    /// The usage object as reported so far (Anthropic's stream reports it in two parts).
    public private(set) var usage: [String: JSONValue]?
    public private(set) var model: String?
    public private(set) var responseID: String?
    /// OpenAI's response `service_tier` (Anthropic's is in the usage object).
    public private(set) var serviceTier: String?
    /// The stream reported an error event or stopped before its end.
    public private(set) var sawErrorEvent = false
    /// Standard meters counted from the response's content: tool calls the model asked for
    /// (messages), added up chunk by chunk.
    private var contentMeters: [String: Int64] = [:]
    /// A chat completion's tool calls, each once: "choice/index" (a stream's deltas of one call
    /// share its index; some servers repeat its id on every delta), or the id in a whole body.
    private var chatToolCalls = Set<String>()
    /// Standard meters counted from a Responses API `output` array; the latest response object
    /// seen wins (a stream sends it empty at the start and whole at the end).
    private var outputMeters: [String: Int64] = [:]

    /// Bodies larger than this are forwarded but not read for usage.
    static let maxWholeBody = 16 << 20

    public init(api: GatewayAPI, isEventStream: Bool, removeUsageChunk: Bool) {
        self.api = api
        self.isEventStream = isEventStream
        self.removeUsageChunk = removeUsageChunk && isEventStream
    }

    /// Takes the next bytes from upstream; returns the bytes to forward now.
    public mutating func feed(_ bytes: [UInt8]) -> [UInt8] {
        guard isEventStream else {
            if whole.count + bytes.count <= Self.maxWholeBody { whole += bytes }
            return bytes
        }
        pending += bytes
        var out: [UInt8] = []
        // Whole events only: an event ends at a blank line.
        while let end = Self.eventEnd(in: pending) {
            let event = Array(pending[..<end.eventEnd])
            let separator = pending[end.eventEnd..<end.next]
            pending.removeFirst(end.next)
            if let forwarded = scan(event) {
                out += forwarded
                out += separator
            }
        }
        return out
    }

    /// The upstream is done: returns what is left to forward and reads a whole body's usage.
    public mutating func finish() -> [UInt8] {
        if !isEventStream {
            if case .success(.object(let members)) = JSONValue.parse(whole) {
                read(members)
            }
            return []
        }
        let rest = pending
        pending = []
        if !rest.isEmpty, let forwarded = scan(rest) { return forwarded }
        return []
    }

    /// Finds the end of the first event: (end of its text, start of the next).
    static func eventEnd(in bytes: [UInt8]) -> (eventEnd: Int, next: Int)? {
        var index = 0
        while index + 1 < bytes.count {
            if bytes[index] == 0x0a && bytes[index + 1] == 0x0a { return (index, index + 2) }
            if bytes[index] == 0x0a && bytes[index + 1] == 0x0d && index + 2 < bytes.count && bytes[index + 2] == 0x0a {
                return (index, index + 3)
            }
            index += 1
        }
        return nil
    }

    /// Reads one event; returns it to forward (possibly edited), or nil to leave it out.
    private mutating func scan(_ event: [UInt8]) -> [UInt8]? {
        var data: [UInt8] = []
        var name = ""
        for line in event.split(separator: 0x0a, omittingEmptySubsequences: false) {
            var text = Array(line)
            if text.last == 0x0d { text.removeLast() }
            if text.starts(with: Array("data:".utf8)) {
                var value = Array(text.dropFirst(5))
                if value.first == 0x20 { value.removeFirst() }
                if !data.isEmpty { data.append(0x0a) }
                data += value
            } else if text.starts(with: Array("event:".utf8)) {
                name = String(decoding: text.dropFirst(6), as: UTF8.self).trimmingSpaces
            }
        }
        if name == "error" { sawErrorEvent = true }
        guard !data.isEmpty, data != Array("[DONE]".utf8), case .success(.object(let members)) = JSONValue.parse(data) else { return event }
        if members["type"] == .string("error") { sawErrorEvent = true }
        read(members)
        guard removeUsageChunk else { return event }
        // The usage-only chunk the caller did not ask for: choices empty, usage set.
        if members["choices"] == .array([]), case .object? = members["usage"] { return nil }
        return Self.removingNullUsage(event)
    }

    /// Takes usage, model and id from a response object, a chunk or a stream event.
    private mutating func read(_ members: [String: JSONValue]) {
        switch api {
        case .chatCompletions:
            take(members)
            // A whole body's `message.tool_calls`, or a chunk's `delta.tool_calls`, whose deltas
            // of one call share its `index` (OpenAI sends the id in the first only; LiteLLM,
            // DeepSeek and Qwen repeat it).
            if case .array(let choices)? = members["choices"] {
                for (position, choice) in choices.enumerated() {
                    let choiceIndex = choice["index"].flatMap { if case .integer(.value(let value)) = $0 { value } else { nil } } ?? Int64(position)
                    for part in ["message", "delta"] {
                        guard case .array(let calls)? = choice[part]?["tool_calls"] else { continue }
                        for (order, call) in calls.enumerated() {
                            if case .integer(.value(let index))? = call["index"] {
                                chatToolCalls.insert("\(choiceIndex)/\(index)")
                            } else if let id = call["id"]?.string {
                                chatToolCalls.insert("\(choiceIndex)/id \(id)")
                            } else if part == "message" {
                                chatToolCalls.insert("\(choiceIndex)/\(order)")
                            }
                        }
                    }
                }
            }
        case .responses:
            // A failed response arrives on a 200 stream: it is the call's error.
            if members["type"] == .string("response.failed") { sawErrorEvent = true }
            // Streamed: response.created / .completed / .incomplete / .failed carry the response.
            let response: [String: JSONValue]
            if case .object(let inner)? = members["response"] { response = inner } else { response = members }
            take(response)
            if case .array(let items)? = response["output"] {
                var counted: [String: Int64] = [:]
                for item in items {
                    let meter: StandardMeter? = switch item["type"]?.string {
                    case "function_call", "custom_tool_call", "mcp_call", "computer_call", "local_shell_call": .toolCalls
                    case "web_search_call": .webSearchRequests
                    case "file_search_call": .fileSearchRequests
                    case "image_generation_call": .imagesGenerated
                    case "code_interpreter_call": .codeInterpreterCalls
                    default: nil
                    }
                    if let meter { counted[meter.rawValue, default: 0] += 1 }
                }
                outputMeters = counted
            }
        case .messages:
            switch members["type"] {
            case .string("message_start")?:
                if case .object(let message)? = members["message"] { take(message) }
            case .string("message_delta")?:
                // Cumulative counts; they win over message_start's. A null count means "unchanged":
                // Anthropic sends "input_tokens": null in the last delta of some streams.
                if case .object(let delta)? = members["usage"] { merge(delta) }
            case .string("content_block_start")?:
                if members["content_block"]?["type"] == .string("tool_use") { add(.toolCalls, 1) }
            default:
                take(members)
                if case .array(let blocks)? = members["content"] {
                    add(.toolCalls, Int64(blocks.filter { $0["type"] == .string("tool_use") }.count))
                }
            }
        }
    }

    private mutating func add(_ meter: StandardMeter, _ quantity: Int64) {
        guard quantity > 0 else { return }
        contentMeters[meter.rawValue, default: 0] += quantity
    }

    private mutating func take(_ object: [String: JSONValue]) {
        if case .object(let reported)? = object["usage"] { merge(reported) }
        if let model = object["model"]?.string { self.model = model }
        if let id = object["id"]?.string { responseID = id }
        if let tier = object["service_tier"]?.string, StandardProperty.isTier(tier) { serviceTier = tier }
    }

    /// Later usage wins, member by member; a member reported as null keeps the earlier value.
    private mutating func merge(_ reported: [String: JSONValue]) {
        usage = (usage ?? [:]).merging(reported.filter { $0.value != .null }) { $1 }
    }

    /// The `,"usage":null` members include_usage adds to every chunk.
    static func removingNullUsage(_ event: [UInt8]) -> [UInt8] {
        let needle = Array(#","usage":null"#.utf8)
        guard event.count >= needle.count else { return event }
        var out: [UInt8] = []
        out.reserveCapacity(event.count)
        var index = 0
        while index < event.count {
            if event[index] == needle[0] && index + needle.count <= event.count && event[index..<index + needle.count].elementsEqual(needle) {
                index += needle.count
            } else {
                out.append(event[index])
                index += 1
            }
        }
        return out
    }

    /// The reported usage as canonical counts, or why there is none.
    public func counts() -> Result<TokenCounts, EventDecodingError>? {
        guard let usage else { return nil }
        return ProviderUsageMapper.map(api.usageProvider, usage: .object(usage)).map { counts in
            var counts = counts
            counts.meters.merge(contentMeters) { $0 + $1 }
            if !chatToolCalls.isEmpty { counts.meters[StandardMeter.toolCalls.rawValue, default: 0] += Int64(chatToolCalls.count) }
            counts.meters.merge(outputMeters) { $0 + $1 }
            counts.serviceTier = counts.serviceTier ?? serviceTier
            return counts
        }
    }
}

private extension String {
    var trimmingSpaces: String {
        var text = Substring(self)
        while text.first == " " { text.removeFirst() }
        while text.last == " " { text.removeLast() }
        return String(text)
    }
}

/// An error answered on a gateway route, in the shape the vendor's own API and SDKs use, with the
/// RFC 9457 problem details kept beside it (`problem`), so a client of either kind reads it.
///
/// Sources: OpenAI API reference, "Error codes" (`{"error":{"message","type","param","code"}}`);
/// Anthropic API, "Errors" (`{"type":"error","error":{"type","message"}}`, 402 `billing_error`).
public enum GatewayErrorBody {
    /// The vendor's error type for an HTTP status.
    public static func errorType(_ vendor: GatewayAPI.Vendor, status: Int) -> String {
        switch (vendor, status) {
        case (.anthropic, 401): "authentication_error"
        case (.anthropic, 402): "billing_error"
        case (.anthropic, 403): "permission_error"
        case (.anthropic, 404): "not_found_error"
        case (.anthropic, 413): "request_too_large"
        case (.anthropic, 429): "rate_limit_error"
        case (.anthropic, 504): "timeout_error"
        case (.anthropic, 529): "overloaded_error"
        case (.anthropic, 500...): "api_error"
        case (.anthropic, _): "invalid_request_error"
        case (.openai, 402): "insufficient_quota"
        case (.openai, 403): "permission_error"
        case (.openai, 429): "rate_limit_exceeded"
        case (.openai, 500...): "server_error"
        case (.openai, _): "invalid_request_error"
        }
    }

    /// The body: the vendor's error object, then `problem` holding `problem` (an RFC 9457 object,
    /// already rendered). `code` is a stable snake_case code (OpenAI's `error.code`).
    public static func render(_ vendor: GatewayAPI.Vendor, status: Int, message: String, code: String, problem: [UInt8]) -> [UInt8] {
        var json = JSONWriter(capacity: problem.count + message.utf8.count + 128)
        json.raw("{")
        switch vendor {
        case .openai:
            json.key("error", first: true)
            json.raw("{")
            json.key("message", first: true)
            json.string(message)
            json.key("type")
            json.string(errorType(vendor, status: status))
            json.key("param")
            json.raw("null")
            json.key("code")
            json.string(code)
            json.raw("}")
        case .anthropic:
            json.key("type", first: true)
            json.string("error")
            json.key("error")
            json.raw("{")
            json.key("type", first: true)
            json.string(errorType(vendor, status: status))
            json.key("message")
            json.string(message)
            json.raw("}")
        }
        json.key("problem")
        json.raw(problem)
        json.raw("}")
        return json.bytes
    }
}
