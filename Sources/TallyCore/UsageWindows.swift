/// Window sizes of the materialized usage tables. All windows are UTC.
public enum Granularity: String, Sendable, CaseIterable {
    case hour, day, month

    /// Start of the window holding `microseconds`, in microseconds since the epoch.
    public func windowStart(_ microseconds: Int64) -> Int64 {
        let hour: Int64 = 3_600_000_000
        let day: Int64 = 86_400_000_000
        func floorDiv(_ a: Int64, _ b: Int64) -> Int64 { a >= 0 ? a / b : (a - b + 1) / b }
        switch self {
        case .hour: return floorDiv(microseconds, hour) * hour
        case .day: return floorDiv(microseconds, day) * day
        case .month:
            let days = Int(floorDiv(microseconds, day))
            let (year, month, _) = EventTime.civil(fromDays: days)
            return Int64(EventTime.daysFromCivil(year: year, month: month, day: 1)) * day
        }
    }

    /// End (exclusive) of the window holding `microseconds`: the next window's start.
    public func windowEnd(_ microseconds: Int64) -> Int64 {
        let start = windowStart(microseconds)
        switch self {
        case .hour: return start + 3_600_000_000
        case .day: return start + 86_400_000_000
        // 32 days after the first of a month always lies in the next month.
        case .month: return windowStart(start + 32 * 86_400_000_000)
        }
    }
}

/// What usage is grouped by. Missing optional labels are the empty string.
public struct UsageDimensions: Hashable, Sendable, Comparable {
    public var customerID: String
    public var model: String
    public var feature: String
    public var provider: String
    public var environment: String
    /// How the call ended (`CallStatus.dimension`: success, retry, error, cancelled, `other` for
    /// any other `status` property, empty without one), so windows show what failed calls used.
    public var status: String

    public init(customerID: String, model: String, feature: String = "", provider: String = "", environment: String = "", status: String = "") {
        self.customerID = customerID
        self.model = model
        self.feature = feature
        self.provider = provider
        self.environment = environment
        self.status = status
    }

    public init(_ event: UsageEvent) {
        self.init(customerID: event.subject, model: event.model, feature: event.feature ?? "",
                  provider: event.provider ?? "", environment: event.environment ?? "", status: CallStatus.dimension(of: event))
    }

    public static func < (a: UsageDimensions, b: UsageDimensions) -> Bool {
        (a.customerID, a.model, a.feature, a.provider, a.environment, a.status) < (b.customerID, b.model, b.feature, b.provider, b.environment, b.status)
    }

    /// Byte for byte, as PostgreSQL keys the window rows (`ExactText` says why).
    public static func == (a: UsageDimensions, b: UsageDimensions) -> Bool {
        ExactText.equal(a.customerID, b.customerID) && ExactText.equal(a.model, b.model) && ExactText.equal(a.feature, b.feature)
            && ExactText.equal(a.provider, b.provider) && ExactText.equal(a.environment, b.environment) && ExactText.equal(a.status, b.status)
    }

    public func hash(into hasher: inout Hasher) {
        for text in [customerID, model, feature, provider, environment, status] { ExactText.hash(text, into: &hasher) }
    }
}

/// Token sums of a window. Additive, so deltas from any batch split add up to the same totals.
///
/// 128 bits wide: one event holds at most 2^53 − 1 tokens of each kind, so a window's sums pass
/// `Int64` after about a thousand of the largest; 128 bits take 2^75 such events. PostgreSQL
/// keeps the folded sums as `numeric`, and `storedRows` splits a delta that exceeds `Int64`.
public struct UsageMeasures: Hashable, Sendable {
    public var inputTokens: Int128 = 0
    public var outputTokens: Int128 = 0
    public var cacheReadInputTokens: Int128 = 0
    public var cacheWriteInputTokens: Int128 = 0
    public var reasoningOutputTokens: Int128 = 0
    public var totalTokens: Int128 = 0
    public var eventCount: Int128 = 0

    public init() {}

    public init(_ event: UsageEvent) {
        inputTokens = Int128(event.inputTokens)
        outputTokens = Int128(event.outputTokens)
        cacheReadInputTokens = Int128(event.cacheReadInputTokens)
        cacheWriteInputTokens = Int128(event.cacheWriteInputTokens)
        reasoningOutputTokens = Int128(event.reasoningOutputTokens)
        totalTokens = inputTokens + outputTokens
        eventCount = 1
    }

    /// The seven sums in column order (input, output, cache read, cache write, reasoning, total, events).
    public var values: [Int128] {
        [inputTokens, outputTokens, cacheReadInputTokens, cacheWriteInputTokens, reasoningOutputTokens, totalTokens, eventCount]
    }

    /// Whether every sum fits one `bigint` delta row. Asked per window of every batch: compares
    /// in place instead of building `values`.
    public var fitsOneRow: Bool {
        let limit = Int128(Int64.max)
        return inputTokens <= limit && outputTokens <= limit && cacheReadInputTokens <= limit && cacheWriteInputTokens <= limit
            && reasoningOutputTokens <= limit && totalTokens <= limit && eventCount <= limit
    }

    /// The sums as `bigint` rows that add up to them: one row unless a sum exceeds `Int64`.
    public var storedRows: [[Int64]] {
        var left = values
        var rows: [[Int64]] = []
        repeat {
            let row = left.map { Int64(min($0, Int128(Int64.max))) }
            for index in left.indices { left[index] -= Int128(row[index]) }
            rows.append(row)
        } while left.contains { $0 > 0 }
        return rows
    }

    public static func += (lhs: inout UsageMeasures, rhs: UsageMeasures) {
        lhs.inputTokens += rhs.inputTokens
        lhs.outputTokens += rhs.outputTokens
        lhs.cacheReadInputTokens += rhs.cacheReadInputTokens
        lhs.cacheWriteInputTokens += rhs.cacheWriteInputTokens
        lhs.reasoningOutputTokens += rhs.reasoningOutputTokens
        lhs.totalTokens += rhs.totalTokens
        lhs.eventCount += rhs.eventCount
    }
}

/// One window: its dimensions, size and start.
public struct WindowKey: Hashable, Sendable, Comparable {
    public var dimensions: UsageDimensions
    public var granularity: Granularity
    /// Microseconds since the epoch, UTC.
    public var start: Int64

    public init(dimensions: UsageDimensions, granularity: Granularity, start: Int64) {
        self.dimensions = dimensions
        self.granularity = granularity
        self.start = start
    }

    public static func < (a: WindowKey, b: WindowKey) -> Bool {
        (a.dimensions, a.start) < (b.dimensions, b.start)
    }
}

/// Window deltas of a set of accepted events.
///
/// PostgreSQL stores hourly rows and derives days and months from them; the
/// coarser granularities here serve tools and tests that roll up in memory.
public struct WindowDeltas: Sendable, Equatable {
    public private(set) var windows: [Granularity: [WindowKey: UsageMeasures]] = [:]
    public let granularities: [Granularity]

    public init(granularities: [Granularity] = Granularity.allCases) {
        self.granularities = granularities
    }

    /// Adds a model call's tokens; a meter-only event has none (its meters have windows of their own).
    public mutating func add(_ event: UsageEvent) {
        guard event.isModelCall else { return }
        let dimensions = UsageDimensions(event)
        let measures = UsageMeasures(event)
        for granularity in granularities {
            let key = WindowKey(dimensions: dimensions, granularity: granularity,
                                start: granularity.windowStart(event.time.microseconds))
            windows[granularity, default: [:]][key, default: UsageMeasures()] += measures
        }
    }

    /// Room for this many windows of each granularity, so adding a batch rehashes none.
    public mutating func reserveCapacity(_ windowsPerGranularity: Int) {
        for granularity in granularities { windows[granularity, default: [:]].reserveCapacity(windowsPerGranularity) }
    }

    public mutating func merge(_ other: WindowDeltas) {
        for (granularity, rows) in other.windows {
            for (key, measures) in rows { windows[granularity, default: [:]][key, default: UsageMeasures()] += measures }
        }
    }

    /// Rows of one granularity. Unordered: one customer's rows are written by one
    /// instance at a time (invariant 3), so upserts cannot deadlock on row order.
    public func rows(_ granularity: Granularity) -> [(key: WindowKey, measures: UsageMeasures)] {
        (windows[granularity] ?? [:]).map { ($0.key, $0.value) }
    }

    public var isEmpty: Bool { windows.values.allSatisfy(\.isEmpty) }
}

/// Text compared and hashed byte for byte (its UTF-8), as PostgreSQL compares `text` keys.
///
/// Swift's `String` equality is Unicode canonical equivalence: "é" (U+00E9) equals "e" + U+0301.
/// Keys that PostgreSQL keeps apart must not be merged in memory, or how a stream is cut into
/// batches would decide whether two such values share a window (a replay would differ).
public struct ExactText: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let text: String

    public init(_ text: String) { self.text = text }

    public static func == (a: ExactText, b: ExactText) -> Bool { equal(a.text, b.text) }
    public static func < (a: ExactText, b: ExactText) -> Bool { a.text.utf8.lexicographicallyPrecedes(b.text.utf8) }
    public func hash(into hasher: inout Hasher) { Self.hash(text, into: &hasher) }
    public var description: String { text }

    /// Feeds `text`'s UTF-8 bytes (and their count, so consecutive texts cannot run together).
    public static func hash(_ text: String, into hasher: inout Hasher) {
        var copy = text
        copy.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
        hasher.combine(text.utf8.count)
    }

    public static func equal(_ a: String, _ b: String) -> Bool {
        // Native and small strings hold contiguous UTF-8: compare the buffers (the generic
        // sequence comparison was a hot spot of the aggregator's window lookups).
        let contiguous = a.utf8.withContiguousStorageIfAvailable { x in
            b.utf8.withContiguousStorageIfAvailable { y in x.count == y.count && x.elementsEqual(y) }
        }
        if let contiguous, let result = contiguous { return result }
        return a.utf8.elementsEqual(b.utf8)
    }
}
