/// The dedup key (invariant 2): an event's CloudEvents identity, `source` + `id`, scoped to its
/// customer. Independent of event time. Wallet grants are identified by their id alone.
public struct DedupKey: Hashable, Sendable, Comparable {
    public let customerID: String
    public let source: String
    public let eventID: String

    /// The source of every wallet grant's key: a grant's id is the wallet's idempotency key
    /// whichever tool sent it.
    public static let grantSource = ""
    /// The source of every grant void's key (a control character: no event's source holds one).
    public static let grantVoidSource = "\u{2}"
    /// The source of every budget declaration's key (a namespace of its own, like voids).
    public static let budgetSource = "\u{3}"
    /// The source of a key stored before identities included it (migration 0014): it stands for
    /// the id from every source, as it did then. No valid source holds a control character.
    public static let anySource = "\u{1}"

    public init(customerID: String, source: String, eventID: String) {
        self.customerID = customerID
        self.source = source
        self.eventID = eventID
    }

    public static func < (a: DedupKey, b: DedupKey) -> Bool {
        (a.customerID, a.eventID, a.source) < (b.customerID, b.eventID, b.source)
    }
}

/// Where a record sits in the log.
public struct LogPosition: Hashable, Sendable, Comparable {
    public let partition: Int32
    public let offset: Int64

    public init(partition: Int32, offset: Int64) {
        self.partition = partition
        self.offset = offset
    }

    public static func < (a: LogPosition, b: LogPosition) -> Bool { (a.partition, a.offset) < (b.partition, b.offset) }
}

/// Anything deduplicated by (customer, event id): where it sits in the log and what it contains.
public protocol DedupCandidate: Sendable {
    var key: DedupKey { get }
    var position: LogPosition { get }
    /// Fingerprint of the decoded content: equal for equal content whatever the JSON layout.
    var contentHash: UInt64 { get }
    /// The key's fingerprint in this process's `DedupKeyCache`.
    var keyFingerprint: DedupKeyCache.Fingerprint { get }
}

extension DedupCandidate {
    public var keyFingerprint: DedupKeyCache.Fingerprint { DedupKeyCache.fingerprint(key) }
}

extension Array where Element: DedupCandidate {
    /// The candidates' indices sorted by key, nearly the order of a keys table's primary key
    /// (bytewise, as COLLATE "C" compares): a server storing them inserts each key next to the one
    /// before it in the index, on pages it has at hand, instead of all over it. Only that cost
    /// depends on this order. It compares the first 16 bytes of the customer and 8 of the event
    /// id, packed into integers: several times cheaper than comparing strings, and as good for
    /// the index. Indices rather than the candidates themselves: copying a million events into a
    /// sorted array cost as much as sorting them.
    public func keyOrder() -> [Int] {
        var order = indices.map { index in
            let key = self[index].key
            let customer = Self.bigEndianPrefix(key.customerID)
            return (customer.high, customer.low, Self.bigEndianPrefix(key.eventID).high, index)
        }
        order.sort { ($0.0, $0.1, $0.2) < ($1.0, $1.1, $1.2) }
        return order.map(\.3)
    }

    /// The first 16 UTF-8 bytes of `text` as two big-endian integers, zero-padded, so the
    /// integers order as the bytes do.
    private static func bigEndianPrefix(_ text: String) -> (high: UInt64, low: UInt64) {
        var high: UInt64 = 0
        var low: UInt64 = 0
        for (count, byte) in text.utf8.prefix(16).enumerated() {
            if count < 8 { high |= UInt64(byte) << (56 - 8 * count) } else { low |= UInt64(byte) << (56 - 8 * (count - 8)) }
        }
        return (high, low)
    }
}

/// A decoded usage event, where it came from, and the fingerprint of its content.
public struct PositionedEvent: DedupCandidate, Equatable {
    /// The event lives in a box: a batch passes its events through dedup, pricing and rating,
    /// and copying a box is one reference count instead of one per string in the event.
    private final class Box: Sendable {
        let event: UsageEvent
        init(_ event: UsageEvent) { self.event = event }
    }

    private let box: Box
    public var event: UsageEvent {
        _read { yield box.event }
    }
    public let position: LogPosition
    /// Fingerprint of the decoded content: equal for equal content whatever the JSON layout.
    public let contentHash: UInt64
    /// Worked out once: the key cache is asked before the commit and told after it.
    public let keyFingerprint: DedupKeyCache.Fingerprint

    public init(event: UsageEvent, position: LogPosition) {
        self.init(event: event, position: position, identity: Self.identity(of: event))
    }

    /// What `init(event:position:)` works out from the event, apart so a consumer can work it
    /// out for many events on several threads.
    public struct Identity: Sendable {
        let contentHash: UInt64
        let keyFingerprint: DedupKeyCache.Fingerprint
    }

    public static func identity(of event: UsageEvent) -> Identity {
        Identity(contentHash: ContentHash.of(event),
                 keyFingerprint: DedupKeyCache.fingerprint(DedupKey(customerID: event.subject, source: event.source, eventID: event.id)))
    }

    /// - Parameter identity: `identity(of: event)`.
    public init(event: UsageEvent, position: LogPosition, identity: Identity) {
        self.box = Box(event)
        self.position = position
        self.contentHash = identity.contentHash
        self.keyFingerprint = identity.keyFingerprint
    }

    public static func == (a: PositionedEvent, b: PositionedEvent) -> Bool {
        a.position == b.position && a.contentHash == b.contentHash && (a.box === b.box || a.event == b.event)
    }

    public var key: DedupKey { DedupKey(customerID: event.subject, source: event.source, eventID: event.id) }
}

/// A decoded wallet grant and where it came from.
public struct PositionedGrant: DedupCandidate, Equatable {
    public let grant: GrantEvent
    public let position: LogPosition
    public let contentHash: UInt64

    public init(grant: GrantEvent, position: LogPosition) {
        self.grant = grant
        self.position = position
        self.contentHash = ContentHash.of(grant)
    }

    public var key: DedupKey { DedupKey(customerID: grant.subject, source: DedupKey.grantSource, eventID: grant.id) }
}

/// A decoded grant void and where it came from.
public struct PositionedGrantVoid: DedupCandidate, Equatable {
    public let void: GrantVoidEvent
    public let position: LogPosition
    public let contentHash: UInt64

    public init(void: GrantVoidEvent, position: LogPosition) {
        self.void = void
        self.position = position
        self.contentHash = ContentHash.of(void)
    }

    /// In a namespace of their own (a grant named `void-g1` is not the void of `g1`); one id is one
    /// void, whichever tool sent it.
    public var key: DedupKey { DedupKey(customerID: void.subject, source: DedupKey.grantVoidSource, eventID: void.id) }
}

/// A decoded budget declaration and where it came from.
public struct PositionedBudget: DedupCandidate, Equatable {
    public let budget: BudgetEvent
    public let position: LogPosition
    public let contentHash: UInt64

    public init(budget: BudgetEvent, position: LogPosition) {
        self.budget = budget
        self.position = position
        self.contentHash = ContentHash.of(budget)
    }

    public var key: DedupKey { DedupKey(customerID: budget.subject, source: DedupKey.budgetSource, eventID: budget.id) }
}

/// An event id seen again with different content: the first (by offset) counts, this one is recorded.
public struct EventConflict: Sendable, Equatable {
    public let key: DedupKey
    public let firstHash: UInt64
    public let conflictingHash: UInt64
    public let position: LogPosition
}

/// What to do with a batch's events after deduplication.
public struct DedupDecision<Candidate: DedupCandidate>: Sendable {
    /// First sightings, in log order: counted, and their keys stored.
    public var accepted: [Candidate] = []
    /// Exact re-sends of a counted event.
    public var duplicates = 0
    /// Same id, different content.
    public var conflicts: [EventConflict] = []
}

/// Deduplicates one batch against the keys already stored (pure: no I/O).
///
/// Events are taken in log order per partition; a customer lives on one
/// partition, so the outcome does not depend on how the log is cut into batches.
public enum Deduplicator {
    /// The keys whose stored fingerprints the decision needs, each once (unordered).
    public static func keys<Candidate: DedupCandidate>(of events: [Candidate]) -> [DedupKey] {
        Array(Set(events.map(\.key)))
    }

    /// - Parameter stored: fingerprints of keys already counted in earlier batches.
    ///
    /// Keys are compared by their 128-bit `keyFingerprint`, as the key cache does: hashing
    /// two strings per event into a dictionary cost more than the rest of the decision.
    public static func decide<Candidate: DedupCandidate>(_ events: [Candidate], stored: [DedupKey: UInt64]) -> DedupDecision<Candidate> {
        var decision = DedupDecision<Candidate>()
        var seen = FingerprintTable(minimumCapacity: stored.count + events.count)
        for (key, contentHash) in stored { seen.insert(DedupKeyCache.fingerprint(key), contentHash: contentHash) }
        decision.accepted.reserveCapacity(events.count)
        // Callers mostly pass log order already; sorting copies every candidate. Checked by
        // index, since pairing the candidates up would copy each of them too.
        let inLogOrder = events.indices.dropFirst().allSatisfy { events[$0 - 1].position < events[$0].position }
        for positioned in inLogOrder ? events : events.sorted(by: { $0.position < $1.position }) {
            let fingerprint = positioned.keyFingerprint
            if let first = seen[fingerprint] {
                if first == positioned.contentHash {
                    decision.duplicates += 1
                } else {
                    decision.conflicts.append(EventConflict(key: positioned.key, firstHash: first, conflictingHash: positioned.contentHash,
                                                            position: positioned.position))
                }
            } else {
                seen.insert(fingerprint, contentHash: positioned.contentHash)
                decision.accepted.append(positioned)
            }
        }
        return decision
    }
}

/// Deterministic 64-bit FNV-1a (Swift's `Hasher` is seeded per process, so it cannot be stored).
public enum ContentHash {
    /// Fingerprint of every field of an event, in a fixed order with separators.
    /// Stored with the dedup keys, so the value for a given event never changes.
    public static func of(_ event: UsageEvent) -> UInt64 {
        // Field by field rather than over arrays of them: this runs once per consumed event.
        var hasher = FNV()
        hasher.add(event.id)
        hasher.add(event.source)
        hasher.add(event.subject)
        hasher.add(event.model)
        hasher.add(event.provider ?? "\u{0}")
        hasher.add(event.feature ?? "\u{0}")
        hasher.add(event.environment ?? "\u{0}")
        hasher.add(event.time.microseconds)
        hasher.add(event.inputTokens)
        hasher.add(event.outputTokens)
        hasher.add(event.cacheReadInputTokens)
        hasher.add(event.cacheWriteInputTokens)
        // Only when set: events without the split keep the hash they always had (stored keys).
        if event.cacheWrite1hInputTokens != 0 {
            hasher.add(UInt8(0x1d))
            hasher.add(event.cacheWrite1hInputTokens)
        }
        hasher.add(event.reasoningOutputTokens)
        hasher.addSortedByKey(event.properties)
        // Only when set, like the 1-hour split: events without meters keep their stored hashes.
        if !event.meters.isEmpty {
            hasher.add(UInt8(0x1c))
            for (name, quantity) in event.meters.sorted(by: { $0.key < $1.key }) {
                hasher.add(name)
                hasher.add(quantity)
            }
        }
        hasher.add(UInt8(0x1e))
        hasher.addSortedByKey(event.extensions)
        return hasher.value
    }

    /// Fingerprint of a grant's terms; the type byte keeps it apart from any usage event's.
    ///
    /// Neither `time` nor `source` is in it: a grant sent again (a retry, `tally grant` run twice)
    /// carries a new time and perhaps another tool's source, and is the same grant. Another
    /// amount, currency, priority, expiry or origin under the same id is a conflict.
    public static func of(_ grant: GrantEvent) -> UInt64 {
        var hasher = FNV()
        hasher.add(UInt8(0x03))
        for text in [grant.id, grant.subject, grant.currency.code, grant.grantSource.rawValue, grant.expiresAt?.text ?? "\u{0}"] {
            hasher.add(text)
        }
        for number in [grant.amountNanos, grant.priority, grant.expiresAt?.microseconds ?? Int64.min] {
            hasher.add(number)
        }
        hasher.addSortedByKey(grant.extensions)
        return hasher.value
    }

    /// Fingerprint of a void: which grant it voids (its time, source and reason may differ in a retry).
    public static func of(_ void: GrantVoidEvent) -> UInt64 {
        var hasher = FNV()
        hasher.add(UInt8(0x04))
        for text in [void.id, void.subject, void.grantID] { hasher.add(text) }
        return hasher.value
    }

    public static func of(_ budget: BudgetEvent) -> UInt64 {
        var hasher = FNV()
        hasher.add(UInt8(0x05))
        var data = JSONWriter()
        EventEncoder.writeBudgetData(&data, name: budget.name, definition: budget.definition)
        for text in [budget.id, budget.subject, String(decoding: data.bytes, as: UTF8.self)] { hasher.add(text) }
        return hasher.value
    }

    /// 64-bit FNV-1a over fields; `DedupKeyCache` uses it too.
    struct FNV {
        var value: UInt64 = 0xcbf2_9ce4_8422_2325

        mutating func add(_ byte: UInt8) {
            value ^= UInt64(byte)
            value = value &* 0x0000_0100_0000_01b3
        }

        /// Strings end with a 0x1f separator so ("ab","c") and ("a","bc") differ.
        mutating func add(_ text: String) {
            let hashedInPlace: Void? = text.utf8.withContiguousStorageIfAvailable { bytes in
                for byte in bytes { add(byte) }
            }
            if hashedInPlace == nil {
                for byte in text.utf8 { add(byte) }
            }
            add(UInt8(0x1f))
        }

        /// Key, value, key, value… in key order (no allocation for the usual zero or one entry).
        mutating func addSortedByKey(_ pairs: [String: String]) {
            if pairs.count <= 1 {
                for (key, value) in pairs { add(key); add(value) }
                return
            }
            // Sorted as pairs: no second lookup per key.
            for (key, value) in pairs.sorted(by: { $0.key < $1.key }) { add(key); add(value) }
        }

        mutating func add(_ number: Int64) {
            var bits = UInt64(bitPattern: number)
            for _ in 0..<8 { add(UInt8(truncatingIfNeeded: bits)); bits >>= 8 }
        }
    }

    /// As a signed value, for a PostgreSQL bigint column.
    public static func signed(_ hash: UInt64) -> Int64 { Int64(bitPattern: hash) }
}
