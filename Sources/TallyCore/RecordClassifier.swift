/// Why a record in the topic is poison: it goes to the dead-letter topic, never stalls the consumer.
public struct PoisonReason: Sendable, Equatable, CustomStringConvertible {
    /// Stable short code: `empty`, `oversize`, `malformed_json`, `schema_invalid`, `unknown_type`, `key_mismatch`.
    public let code: String
    public let detail: String

    public init(code: String, detail: String) {
        self.code = code
        self.detail = detail
    }

    public var description: String { "\(code): \(detail)" }
}

/// What a consumer makes of one record's value.
public enum ClassifiedRecord: Sendable, Equatable {
    case event(TallyEvent)
    case poison(PoisonReason)

    /// - Parameter key: the record key, which must be the event's customer id: one partition must
    ///   hold a customer's whole history (invariant 3), or its order, dedup and wallet would depend
    ///   on how partitions interleave. Nil skips the check (tools reading values alone).
    public static func classify(_ value: [UInt8]?, key: [UInt8]?? = nil) -> ClassifiedRecord {
        guard let value, !value.isEmpty else { return .poison(PoisonReason(code: "empty", detail: "record has no value")) }
        if value.count > EventLimits.maxEventBytes {
            return .poison(PoisonReason(code: "oversize", detail: "record is \(value.count) bytes; events are at most \(EventLimits.maxEventBytes)"))
        }
        switch EventDecoder.decode(value) {
        case .success(let event):
            if let key, !(key.map { $0.elementsEqual(event.customerID.utf8) } ?? false) {
                let shown = key.map { String(decoding: $0.prefix(256), as: UTF8.self) } ?? "no key"
                return .poison(PoisonReason(code: "key_mismatch", detail: "record key (\(shown)) is not the event's customer id \(event.customerID); producers must key records by customer"))
            }
            return .event(event)
        case .failure(let error): return .poison(PoisonReason(code: error.reasonCode, detail: error.description))
        }
    }
}
