/// Why a record in the topic is poison: it goes to the dead-letter topic, never stalls the consumer.
public struct PoisonReason: Sendable, Equatable, CustomStringConvertible {
    /// Stable short code: `empty`, `oversize`, `malformed_json`, `schema_invalid`, `unknown_type`.
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

    public static func classify(_ value: [UInt8]?) -> ClassifiedRecord {
        guard let value, !value.isEmpty else { return .poison(PoisonReason(code: "empty", detail: "record has no value")) }
        if value.count > EventLimits.maxEventBytes {
            return .poison(PoisonReason(code: "oversize", detail: "record is \(value.count) bytes; events are at most \(EventLimits.maxEventBytes)"))
        }
        switch EventDecoder.decode(value) {
        case .success(let event): return .event(event)
        case .failure(let error): return .poison(PoisonReason(code: error.reasonCode, detail: error.description))
        }
    }
}
