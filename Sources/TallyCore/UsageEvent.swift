/// Event types Tally knows. Consumers handle theirs and skip the others;
/// only a record that is no valid event of any known type is poison.
public enum EventType: String, Sendable, CaseIterable {
    case usage = "llm.usage"
    case walletGrant = "tally.wallet.grant"
    case walletGrantVoid = "tally.wallet.grant.void"
    case budget = "tally.budget"
}

/// One model call's token usage, its meter quantities, or both: schema v1
/// (`schemas/usage-event.v1.json`).
///
/// Token counts follow the OpenTelemetry GenAI convention: `inputTokens`
/// includes the cache-read and cache-write subsets, `outputTokens` includes
/// the reasoning subset. An event with meters and no model (a vector search
/// of an agent, an image stored) is no model call: its `model` is empty and
/// its token counts are 0; it adds to meter windows only.
public struct UsageEvent: Hashable, Sendable {
    public var id: String
    public var source: String
    /// The customer: the record key, the unit of partitioning and billing.
    public var subject: String
    public var time: EventTime
    public var model: String
    public var provider: String?
    public var feature: String?
    public var environment: String?
    public var inputTokens: Int64
    public var outputTokens: Int64
    public var cacheReadInputTokens: Int64
    public var cacheWriteInputTokens: Int64
    /// The part of `cacheWriteInputTokens` written with a 1-hour lifetime (Anthropic's
    /// `cache_creation.ephemeral_1h_input_tokens`, Bedrock's `cacheDetails` with `ttl` "1h"),
    /// billed at its own price; the rest are 5-minute writes. 0 in events that do not say.
    public var cacheWrite1hInputTokens: Int64
    public var reasoningOutputTokens: Int64
    public var properties: [String: String]
    /// Quantities of named meters (`web_search_requests: 2`), whole units of each meter's unit,
    /// 0 to `EventLimits.maxTokens`; names follow `MeterDefinition.isValidName`.
    public var meters: [String: Int64]
    /// CloudEvents attributes Tally does not interpret (extensions, `datacontenttype`,
    /// `dataschema`), as their raw JSON text, so the event passes through losslessly.
    public var extensions: [String: String]

    public var customerID: String { subject }
    public var totalTokens: Int64 { inputTokens + outputTokens }
    /// False for a meter-only event, which has no model, no tokens and no token windows.
    public var isModelCall: Bool { !model.isEmpty }

    /// The value of a dimension a meter catalog or a price rule names: one of the event's labels
    /// (`model`, `provider`, `feature`, `environment`) or else a property of that name. The label
    /// wins over a property of the same name; nil when the event has neither.
    public func dimension(_ name: String) -> String? {
        switch name {
        case "model": isModelCall ? model : properties[name]
        case "provider": provider ?? properties[name]
        case "feature": feature ?? properties[name]
        case "environment": environment ?? properties[name]
        default: properties[name]
        }
    }

    public init(id: String, source: String, subject: String, time: EventTime, model: String,
                provider: String? = nil, feature: String? = nil, environment: String? = nil,
                inputTokens: Int64, outputTokens: Int64, cacheReadInputTokens: Int64 = 0,
                cacheWriteInputTokens: Int64 = 0, cacheWrite1hInputTokens: Int64 = 0, reasoningOutputTokens: Int64 = 0,
                properties: [String: String] = [:], meters: [String: Int64] = [:], extensions: [String: String] = [:]) {
        self.id = id
        self.source = source
        self.subject = subject
        self.time = time
        self.model = model
        self.provider = provider
        self.feature = feature
        self.environment = environment
        self.inputTokens = inputTokens
        self.outputTokens = outputTokens
        self.cacheReadInputTokens = cacheReadInputTokens
        self.cacheWriteInputTokens = cacheWriteInputTokens
        self.cacheWrite1hInputTokens = cacheWrite1hInputTokens
        self.reasoningOutputTokens = reasoningOutputTokens
        self.properties = properties
        self.meters = meters
        self.extensions = extensions
    }
}

/// A decoded event of any known type.
public enum TallyEvent: Hashable, Sendable {
    case usage(UsageEvent)
    case grant(GrantEvent)
    case grantVoid(GrantVoidEvent)
    case budget(BudgetEvent)

    public var id: String {
        switch self {
        case .usage(let event): event.id
        case .grant(let grant): grant.id
        case .grantVoid(let void): void.id
        case .budget(let budget): budget.id
        }
    }

    public var customerID: String {
        switch self {
        case .usage(let event): event.subject
        case .grant(let grant): grant.subject
        case .grantVoid(let void): void.subject
        case .budget(let budget): budget.subject
        }
    }
}

/// One rule an event broke: where (`data.input_tokens`) and why.
public struct FieldViolation: Hashable, Sendable, CustomStringConvertible {
    /// Dotted path from the event root; empty for the event itself.
    public let path: String
    public let reason: String

    public init(_ path: String, _ reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String { path.isEmpty ? reason : "\(path): \(reason)" }
}

/// Why bytes are not a valid event.
public enum EventDecodingError: Error, Hashable, Sendable, CustomStringConvertible {
    case malformedJSON(JSONSyntaxError)
    case invalid([FieldViolation])

    public var description: String {
        switch self {
        case .malformedJSON(let error): error.description
        case .invalid(let violations): violations.map(\.description).joined(separator: "; ")
        }
    }

    /// Short machine-readable reason for DLQ headers and metrics labels.
    public var reasonCode: String {
        switch self {
        case .malformedJSON: "malformed_json"
        case .invalid(let violations):
            violations.contains { $0.path == "type" } ? "unknown_type" : "schema_invalid"
        }
    }

    public var violations: [FieldViolation] {
        switch self {
        case .malformedJSON(let error): [FieldViolation("", error.description)]
        case .invalid(let violations): violations
        }
    }
}

/// The limits of schema v1, shared by the validator, the JSON Schema and the docs.
public enum EventLimits {
    /// Whether `text` is a label the schemas accept: `length` characters (Unicode scalars, as
    /// JSON Schema's `maxLength` counts them) and no control character.
    public static func isLabel(_ text: String, length: ClosedRange<Int>) -> Bool {
        length.contains(text.unicodeScalars.count) && !containsControl(text)
    }

    public static let idLength = 1...128
    public static let subjectLength = 1...256
    public static let sourceLength = 1...1024
    public static let modelLength = 1...256
    public static let labelLength = 1...128
    public static let maxProperties = 64
    public static let propertyKeyLength = 1...128
    public static let maxPropertyValueLength = 1024
    public static let maxTokens = JSONReader.maxInteger
    /// Meters one event may carry; each quantity is at most `maxTokens`.
    public static let maxMeters = 32
    /// The largest event, in bytes of its JSON: the ingest API refuses a larger one and the
    /// consumers set a larger record aside, so what the API accepts the pipeline counts. The
    /// schema bounds no event's size (extension attributes are open), so this is the bound: under
    /// librdkafka's default `message.max.bytes` (1,000,000), with room for the key and headers.
    public static let maxEventBytes = 960 * 1024
}
