/// SplitMix64: a small, fast, seedable generator, so a seed always yields the same stream.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Generates a realistic usage stream: skewed customer activity, several models and
/// providers, features, cached and reasoning tokens, and a chosen rate of re-sent events.
///
/// Deterministic for a given seed, so tests and benchmarks can recount what they sent.
public struct LoadGenerator: Sendable {
    public struct Model: Sendable {
        public let name: String
        public let provider: String
        public let reasons: Bool
    }

    public static let models: [Model] = [
        Model(name: "gpt-4o", provider: "openai", reasons: false),
        Model(name: "gpt-4o-mini", provider: "openai", reasons: false),
        Model(name: "o3-mini", provider: "openai", reasons: true),
        Model(name: "claude-sonnet-4", provider: "anthropic", reasons: true),
        Model(name: "claude-haiku-3.5", provider: "anthropic", reasons: false),
        Model(name: "gemini-2.5-pro", provider: "google", reasons: true),
        Model(name: "amazon.nova-pro-v1", provider: "bedrock", reasons: false),
    ]
    public static let features = ["chat", "summarize", "search", "agent", "autocomplete"]

    public var customers: Int
    /// Share of emitted events that repeat an earlier event byte for byte (0...1).
    public var duplicateRate: Double
    /// Event time of the first event, and the spacing between events.
    public var startMicroseconds: Int64
    public var spacingMicroseconds: Int64
    public var idPrefix: String
    /// Adds what `examples/meters/agent-meters.yaml` declares: properties `team`, `end_user` and
    /// `status` on every event, `active_end_users` on every event, `tool_calls` on 30% and
    /// `web_search_requests` on 10%; every 20th event becomes a meter-only `vector_searches`
    /// step (no model call). Drawn from a generator of their own, so the other events' tokens are
    /// those of the stream without meters.
    public var meters = false
    public static let teams = ["search", "support", "sales", "growth", "infra", "data", "mobile", "web"]
    private var random: SeededGenerator
    /// Meters draw from a generator of their own, so the rest of the stream is the same with or without.
    private var meterRandom: SeededGenerator
    private var emitted = 0
    private var recent: [UsageEvent] = []

    public init(seed: UInt64, customers: Int = 100, duplicateRate: Double = 0.05,
                startMicroseconds: Int64, spacingMicroseconds: Int64 = 1_000_000, idPrefix: String = "evt") {
        self.customers = max(1, customers)
        self.duplicateRate = duplicateRate
        self.startMicroseconds = startMicroseconds
        self.spacingMicroseconds = spacingMicroseconds
        self.idPrefix = idPrefix
        random = SeededGenerator(seed: seed)
        meterRandom = SeededGenerator(seed: seed ^ 0x6d65_7465_7273)
    }

    /// The next event; a duplicate of a recent one with probability `duplicateRate`.
    public mutating func next() -> (event: UsageEvent, isDuplicate: Bool) {
        if !recent.isEmpty && Double.random(in: 0..<1, using: &random) < duplicateRate {
            return (recent[Int.random(in: 0..<recent.count, using: &random)], true)
        }
        let index = emitted
        emitted += 1
        // Cubing a uniform draw skews activity: low customer numbers send most events.
        let u = Double.random(in: 0..<1, using: &random)
        let customer = Int(Double(customers) * u * u * u)
        let model = Self.models[Int.random(in: 0..<Self.models.count, using: &random)]
        let input = Int64.random(in: 20...8000, using: &random)
        let cacheRead = Bool.random(using: &random) ? Int64.random(in: 0...(input / 2), using: &random) : 0
        let cacheWrite = Int64.random(in: 0...4, using: &random) == 0 ? Int64.random(in: 0...(input - cacheRead), using: &random) : 0
        let output = Int64.random(in: 1...2000, using: &random)
        let reasoning = model.reasons ? Int64.random(in: 0...output, using: &random) : 0
        let generated = UsageEvent(
            id: "\(idPrefix)-\(index)", source: "tally://loadgen", subject: "cust-\(customer)",
            time: EventTime(microseconds: startMicroseconds + Int64(index) * spacingMicroseconds),
            model: model.name, provider: model.provider,
            feature: Self.features[Int.random(in: 0..<Self.features.count, using: &random)],
            environment: "production",
            inputTokens: input, outputTokens: output, cacheReadInputTokens: cacheRead,
            cacheWriteInputTokens: cacheWrite, reasoningOutputTokens: reasoning,
            properties: ["region": customer % 2 == 0 ? "eu" : "us"])
        let event = meters ? withMeters(generated, customer: customer, index: index) : generated
        if recent.count < 256 { recent.append(event) } else { recent[index % 256] = event }
        return (event, false)
    }

    private mutating func withMeters(_ base: UsageEvent, customer: Int, index: Int) -> UsageEvent {
        var event = base
        let roll = Int.random(in: 0..<100, using: &meterRandom)
        event.properties["team"] = Self.teams[customer % Self.teams.count]
        event.properties["end_user"] = "user-\(customer)-\(Int.random(in: 0..<20, using: &meterRandom))"
        event.properties["status"] = roll < 95 ? "success" : roll < 98 ? "error" : "retry"
        var meters: [String: Int64] = ["active_end_users": 1]
        if Int.random(in: 0..<10, using: &meterRandom) < 3 { meters["tool_calls"] = Int64.random(in: 1...3, using: &meterRandom) }
        if Int.random(in: 0..<10, using: &meterRandom) == 0 { meters["web_search_requests"] = Int64.random(in: 1...3, using: &meterRandom) }
        if index % 20 == 19 {
            // An agent's retrieval step: no model call, no tokens.
            event = UsageEvent(id: event.id, source: event.source, subject: event.subject, time: event.time, model: "",
                               feature: "retrieval", inputTokens: 0, outputTokens: 0, properties: event.properties,
                               meters: ["vector_searches": Int64.random(in: 1...4, using: &meterRandom), "active_end_users": 1])
            return event
        }
        event.meters = meters
        return event
    }
}
