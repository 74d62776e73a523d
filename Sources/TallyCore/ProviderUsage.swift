/// Provider-native usage objects, mapped losslessly onto Tally's token counts.
///
/// Tally counts like OpenTelemetry GenAI: input includes cache reads and writes,
/// output includes reasoning. Providers differ, and each mapping says how:
/// - `openai` (Chat Completions `usage`): `prompt_tokens` includes
///   `prompt_tokens_details.cached_tokens`; `completion_tokens` includes
///   `completion_tokens_details.reasoning_tokens`. OpenAI bills no cache writes.
/// - `openai-responses` (Responses `usage`): `input_tokens` includes
///   `input_tokens_details.cached_tokens`; `output_tokens` includes
///   `output_tokens_details.reasoning_tokens`.
/// - `anthropic` (Messages `usage`): `input_tokens` excludes
///   `cache_read_input_tokens` and `cache_creation_input_tokens`, so input is
///   their sum; thinking is inside `output_tokens` and not reported apart.
///   `cache_creation.ephemeral_1h_input_tokens` is the part of the cache writes
///   with a 1-hour lifetime (billed at 2× input, the 5-minute ones at 1.25×).
/// - `gemini` (`usageMetadata`): `promptTokenCount` includes
///   `cachedContentTokenCount`; `toolUsePromptTokenCount` is further input;
///   `candidatesTokenCount` excludes `thoughtsTokenCount`, so output is their sum.
/// - `bedrock` (Converse `usage`): `inputTokens` excludes `cacheReadInputTokens`
///   and `cacheWriteInputTokens`, so input is their sum. `cacheDetails` splits the
///   cache writes by lifetime: entries `{ "ttl": "1h" | "5m", "inputTokens": n }`.
///
/// Beside tokens, Anthropic's usage reports its server tools, billed per use:
/// `server_tool_use.web_search_requests` and `web_fetch_requests` (Anthropic API,
/// "Web search tool" and "Web fetch tool", usage) become the standard meters of
/// the same names (`StandardMeter`).
public enum UsageProvider: String, Sendable, CaseIterable {
    case openai
    case openaiResponses = "openai-responses"
    case anthropic
    case gemini
    case bedrock

    /// The provider label written into the canonical event.
    public var providerLabel: String {
        switch self {
        case .openai, .openaiResponses: "openai"
        case .anthropic: "anthropic"
        case .gemini: "google"
        case .bedrock: "bedrock"
        }
    }
}

/// Meters Tally fills itself from what a provider reports, under these names: a meter catalog
/// that declares them (with the unit and aggregation it wants) gets their windows. Only
/// quantities above 0 are written.
public enum StandardMeter: String, CaseIterable, Sendable {
    /// Server-side web searches (Anthropic `server_tool_use.web_search_requests`; OpenAI
    /// Responses `web_search_call` output items).
    case webSearchRequests = "web_search_requests"
    /// Server-side page fetches (Anthropic `server_tool_use.web_fetch_requests`).
    case webFetchRequests = "web_fetch_requests"
    /// Calls of the caller's own tools the model asked for (OpenAI `tool_calls`, Responses
    /// `function_call` items, Anthropic `tool_use` content blocks).
    case toolCalls = "tool_calls"
    /// OpenAI Responses `file_search_call` output items.
    case fileSearchRequests = "file_search_requests"
    /// OpenAI Responses `image_generation_call` output items.
    case imagesGenerated = "images_generated"
    /// OpenAI Responses `code_interpreter_call` output items.
    case codeInterpreterCalls = "code_interpreter_calls"
}

/// How a model call ended: the `status` property the gateway and the provider usage endpoints
/// write on every event they make, with the call's `attempt` number where it is known, so meter
/// windows (a dimension `status`) and reports can show what failed and retried calls cost.
public enum CallStatus: String, CaseIterable, Sendable {
    /// Answered in full, at the first attempt (or the attempt is not known).
    case success
    /// Answered in full at a later attempt: the earlier ones failed or timed out.
    case retry
    /// The provider answered with an error, or its stream reported one; tokens it reports
    /// used are still billed.
    case error
    /// Cut short: the stream broke off or the caller went away before the end.
    case cancelled

    /// The property names.
    public static let property = "status"
    public static let attemptProperty = "attempt"

    /// The token windows' `status`: the event's `status` property when it is one of these cases,
    /// `other` for any other value (a caller's own text, up to a property's 1,024 characters,
    /// would make unbounded window keys), empty when the event has none.
    public static func dimension(of event: UsageEvent) -> String {
        guard let value = event.properties[property] else { return "" }
        switch value {
        case "success", "retry", "error", "cancelled": return value
        default: return "other"
        }
    }

    /// - Parameters:
    ///   - errorReported: a streamed response carried an error event.
    ///   - brokeOff: the upstream's response ended before its end.
    ///   - callerLeft: the caller stopped reading before the end.
    public init(upstreamStatus: Int, errorReported: Bool, brokeOff: Bool, callerLeft: Bool, attempt: Int?) {
        if !(200..<300).contains(upstreamStatus) || errorReported {
            self = .error
        } else if brokeOff || callerLeft {
            self = .cancelled
        } else {
            self = (attempt ?? 1) > 1 ? .retry : .success
        }
    }
}

/// Properties Tally fills from what a provider reports, beside `CallStatus`'s: price rules and
/// meter dimensions can name them ("priority calls cost more", "the batch API at half price").
public enum StandardProperty {
    /// The provider's processing tier, as reported: OpenAI's response `service_tier` (`default`,
    /// `flex`, `priority`, `scale`; API reference, "Chat Completions" and "Responses"), Anthropic's
    /// `usage.service_tier` (`standard`, `priority`, `batch`; API reference, "Messages").
    public static let serviceTier = "service_tier"
    /// `"true"` for a call made through a batch API: Anthropic's `service_tier` `batch`, or the
    /// provider usage endpoint's `batch` field (OpenAI's Batch API reports no tier of its own).
    public static let batch = "batch"

    /// A tier as providers spell them (`default`, `priority`, `standard_only`): 1 to 64 of
    /// `a-z`, `0-9`, `_` and `-`. Anything else a response says is ignored rather than stored.
    public static func isTier(_ text: String) -> Bool {
        (1...64).contains(text.utf8.count)
            && text.utf8.allSatisfy { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0)
                || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") }
    }

    /// Sets `service_tier` (and `batch` for Anthropic's `batch` tier) when a tier is known.
    public static func apply(serviceTier: String?, to properties: inout [String: String]) {
        guard let serviceTier else { return }
        properties[Self.serviceTier] = serviceTier
        if serviceTier == "batch" { properties[batch] = "true" }
    }
}

/// Canonical token counts, and the standard meters the usage object reports.
public struct TokenCounts: Equatable, Sendable {
    public var input: Int64
    public var output: Int64
    public var cacheRead: Int64 = 0
    public var cacheWrite: Int64 = 0
    /// The 1-hour part of `cacheWrite`.
    public var cacheWrite1h: Int64 = 0
    public var reasoning: Int64 = 0
    /// Standard meters reported beside the tokens (`StandardMeter` names), quantities above 0.
    public var meters: [String: Int64] = [:]
    /// The service tier the usage object reports (Anthropic's `usage.service_tier`), if any.
    public var serviceTier: String?

    public init(input: Int64, output: Int64, cacheRead: Int64 = 0, cacheWrite: Int64 = 0, cacheWrite1h: Int64 = 0, reasoning: Int64 = 0) {
        self.input = input
        self.output = output
        self.cacheRead = cacheRead
        self.cacheWrite = cacheWrite
        self.cacheWrite1h = cacheWrite1h
        self.reasoning = reasoning
    }
}

public enum ProviderUsageMapper {
    /// Maps `usage` (the provider's object) to canonical counts; violations name paths under `path`.
    public static func map(_ provider: UsageProvider, usage: JSONValue, path: String = "usage") -> Result<TokenCounts, EventDecodingError> {
        var violations: [FieldViolation] = []
        guard case .object = usage else { return .failure(.invalid([FieldViolation(path, "must be the provider's usage object")])) }
        func count(_ keys: [String], required: Bool) -> Int64 {
            var value: JSONValue? = usage
            for key in keys { value = value?[key] }
            let fieldPath = ([path] + keys).joined(separator: ".")
            switch value {
            case nil, .null?:
                if required { violations.append(FieldViolation(fieldPath, "is required")) }
                return 0
            case .integer(.value(let number))? where number >= 0 && number <= EventLimits.maxTokens:
                return number
            default:
                violations.append(FieldViolation(fieldPath, "must be an integer ≥ 0"))
                return 0
            }
        }
        // Anthropic and Bedrock report input without the cached tokens; Tally's input includes them.
        func cachedApart(input: String, cacheRead: String, cacheWrite: String, output: String, oneHour: Int64) -> TokenCounts {
            let read = count([cacheRead], required: false)
            let write = count([cacheWrite], required: false)
            return TokenCounts(input: count([input], required: true) + read + write, output: count([output], required: true),
                               cacheRead: read, cacheWrite: write, cacheWrite1h: oneHour)
        }
        // Bedrock: the 1-hour entries of `cacheDetails`.
        func bedrockOneHour() -> Int64 {
            guard let details = usage["cacheDetails"], details != .null else { return 0 }
            guard case .array(let entries) = details else {
                violations.append(FieldViolation("\(path).cacheDetails", "must be an array of {ttl, inputTokens}"))
                return 0
            }
            var total: Int64 = 0
            for (index, entry) in entries.enumerated() {
                let entryPath = "\(path).cacheDetails[\(index)]"
                guard case .string(let ttl)? = entry["ttl"], case .integer(.value(let tokens))? = entry["inputTokens"],
                      tokens >= 0, tokens <= EventLimits.maxTokens else {
                    violations.append(FieldViolation(entryPath, "must be {\"ttl\": \"5m\" or \"1h\", \"inputTokens\": an integer ≥ 0}"))
                    continue
                }
                if ttl == "1h" { total = min(total + tokens, EventLimits.maxTokens + 1) }
            }
            return total
        }
        var counts: TokenCounts
        switch provider {
        case .openai:
            counts = TokenCounts(input: count(["prompt_tokens"], required: true), output: count(["completion_tokens"], required: true),
                                 cacheRead: count(["prompt_tokens_details", "cached_tokens"], required: false),
                                 reasoning: count(["completion_tokens_details", "reasoning_tokens"], required: false))
        case .openaiResponses:
            counts = TokenCounts(input: count(["input_tokens"], required: true), output: count(["output_tokens"], required: true),
                                 cacheRead: count(["input_tokens_details", "cached_tokens"], required: false),
                                 reasoning: count(["output_tokens_details", "reasoning_tokens"], required: false))
        case .anthropic:
            counts = cachedApart(input: "input_tokens", cacheRead: "cache_read_input_tokens",
                                 cacheWrite: "cache_creation_input_tokens", output: "output_tokens",
                                 oneHour: count(["cache_creation", "ephemeral_1h_input_tokens"], required: false))
        case .gemini:
            let thoughts = count(["thoughtsTokenCount"], required: false)
            counts = TokenCounts(input: count(["promptTokenCount"], required: true) + count(["toolUsePromptTokenCount"], required: false),
                                 output: count(["candidatesTokenCount"], required: false) + thoughts,
                                 cacheRead: count(["cachedContentTokenCount"], required: false), reasoning: thoughts)
        case .bedrock:
            counts = cachedApart(input: "inputTokens", cacheRead: "cacheReadInputTokens",
                                 cacheWrite: "cacheWriteInputTokens", output: "outputTokens", oneHour: bedrockOneHour())
        }
        if provider == .anthropic {
            for meter in [StandardMeter.webSearchRequests, .webFetchRequests] {
                let quantity = count(["server_tool_use", meter.rawValue], required: false)
                if quantity > 0 { counts.meters[meter.rawValue] = quantity }
            }
            if let tier = usage["service_tier"]?.string, StandardProperty.isTier(tier) { counts.serviceTier = tier }
        }
        if !violations.isEmpty { return .failure(.invalid(violations)) }
        if counts.cacheRead + counts.cacheWrite > counts.input || counts.reasoning > counts.output {
            return .failure(.invalid([FieldViolation(path, "inconsistent counts: cached tokens exceed input or reasoning exceeds output")]))
        }
        if counts.cacheWrite1h > counts.cacheWrite {
            return .failure(.invalid([FieldViolation(path, "inconsistent counts: 1-hour cache writes exceed the cache writes")]))
        }
        if counts.input > EventLimits.maxTokens || counts.output > EventLimits.maxTokens {
            return .failure(.invalid([FieldViolation(path, "the counts add up to more than \(EventLimits.maxTokens) tokens, the most an event holds")]))
        }
        return .success(counts)
    }
}

/// Builds a canonical event from a provider-native request:
/// `{"id", "customer", "model", "time", "usage": {…}}` plus optional `source`,
/// `feature`, `environment`, `properties`, `status` (a `CallStatus`; when not given, a
/// `status` property is kept, else an answered call is a `success`, or a `retry` past its
/// first `attempt`), `attempt` (1 for the first try), `service_tier` (the response's, for
/// OpenAI; Anthropic's is read from the usage object) and `batch` (true for a batch API call).
/// Standard meters and properties (`StandardProperty`) the usage object reports are filled in.
///
/// - Important: the result is encoded, not yet validated against schema v1
///   (lengths, limits): pass it through `IngestBatchParser` like any other event.
public enum ProviderEventBuilder {
    public static func build(_ provider: UsageProvider, body: [UInt8]) -> Result<[UInt8], EventDecodingError> {
        let document: JSONValue
        switch JSONValue.parse(body) {
        case .failure(let error): return .failure(.malformedJSON(error))
        case .success(let value): document = value
        }
        guard case .object(let members) = document else { return .failure(.invalid([FieldViolation("", "the body must be a JSON object")])) }
        var violations: [FieldViolation] = []
        func text(_ key: String, required: Bool) -> String? {
            switch members[key] {
            case .string(let value)?: return value
            case nil, .null?:
                if required { violations.append(FieldViolation(key, "is required")) }
                return nil
            default:
                violations.append(FieldViolation(key, "must be a string"))
                return nil
            }
        }
        let id = text("id", required: true)
        let customer = text("customer", required: true)
        let model = text("model", required: true)
        let timeText = text("time", required: true)
        let source = text("source", required: false) ?? "tally://ingest/\(provider.rawValue)"
        let feature = text("feature", required: false)
        let environment = text("environment", required: false)
        var properties: [String: String] = [:]
        if let raw = members["properties"] {
            if case .object(let entries) = raw {
                for (key, value) in entries {
                    if let string = value.string { properties[key] = string } else { violations.append(FieldViolation("properties.\(key)", "must be a string")) }
                }
            } else {
                violations.append(FieldViolation("properties", "must be an object of strings"))
            }
        }
        var attempt: Int64?
        if let value = members["attempt"] {
            if case .integer(.value(let number)) = value, (1...1000).contains(number) {
                attempt = number
                properties[CallStatus.attemptProperty] = String(number)
            } else {
                violations.append(FieldViolation("attempt", "must be an integer from 1 to 1000"))
            }
        }
        // The `status` field, else a `status` property the caller set itself, else how the
        // gateway would see an answered call: a retry after the first attempt, a success.
        if let status = text("status", required: false) {
            if CallStatus(rawValue: status) == nil {
                violations.append(FieldViolation("status", "must be one of \(CallStatus.allCases.map(\.rawValue).joined(separator: ", "))"))
            } else if let own = properties[CallStatus.property], own != status {
                violations.append(FieldViolation("properties.status", "is \"\(own)\" where status is \"\(status)\": give one"))
            }
            properties[CallStatus.property] = status
        } else if properties[CallStatus.property] == nil {
            properties[CallStatus.property] = ((attempt ?? 1) > 1 ? CallStatus.retry : .success).rawValue
        }
        let serviceTier = text("service_tier", required: false)
        if let serviceTier, !StandardProperty.isTier(serviceTier) {
            violations.append(FieldViolation("service_tier", "must be 1 to 64 of a-z, 0-9, _ and - (the tier the provider reported)"))
        }
        var batch = false
        switch members["batch"] {
        case nil, .null?: break
        case .bool(let value)?: batch = value
        default: violations.append(FieldViolation("batch", "must be true or false"))
        }
        let time = timeText.flatMap(EventTime.init)
        if timeText != nil && time == nil {
            violations.append(FieldViolation("time", "must be an RFC 3339 date-time with offset, e.g. 2026-01-01T12:00:00Z"))
        }
        var counts: TokenCounts?
        if let usage = members["usage"] {
            switch ProviderUsageMapper.map(provider, usage: usage) {
            case .success(let mapped): counts = mapped
            case .failure(let problems): violations += problems.violations
            }
        } else {
            violations.append(FieldViolation("usage", "is required"))
        }
        guard violations.isEmpty, let id, let customer, let model, let time, let counts else { return .failure(.invalid(violations)) }
        StandardProperty.apply(serviceTier: serviceTier ?? counts.serviceTier, to: &properties)
        if batch { properties[StandardProperty.batch] = "true" }
        let event = UsageEvent(id: id, source: source, subject: customer, time: time, model: model,
                               provider: provider.providerLabel, feature: feature, environment: environment,
                               inputTokens: counts.input, outputTokens: counts.output, cacheReadInputTokens: counts.cacheRead,
                               cacheWriteInputTokens: counts.cacheWrite, cacheWrite1hInputTokens: counts.cacheWrite1h,
                               reasoningOutputTokens: counts.reasoning, properties: properties, meters: counts.meters)
        return .success(EventEncoder.encode(event))
    }
}
