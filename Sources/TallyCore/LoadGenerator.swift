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
    private var random: SeededGenerator
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
        let event = UsageEvent(
            id: "\(idPrefix)-\(index)", source: "tally://loadgen", subject: "cust-\(customer)",
            time: EventTime(microseconds: startMicroseconds + Int64(index) * spacingMicroseconds),
            model: model.name, provider: model.provider,
            feature: Self.features[Int.random(in: 0..<Self.features.count, using: &random)],
            environment: "production",
            inputTokens: input, outputTokens: output, cacheReadInputTokens: cacheRead,
            cacheWriteInputTokens: cacheWrite, reasoningOutputTokens: reasoning,
            properties: ["region": customer % 2 == 0 ? "eu" : "us"])
        if recent.count < 256 { recent.append(event) } else { recent[index % 256] = event }
        return (event, false)
    }
}
