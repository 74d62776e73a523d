/// Why a record in the topic is poison: it goes to the dead-letter topic, never stalls the consumer.
public struct PoisonReason: Sendable, Equatable, CustomStringConvertible {
    /// Stable short code: `empty`, `oversize`, `malformed_json`, `schema_invalid`, `unknown_type`,
    /// `key_mismatch`, `wrong_partition`, `unsigned_credit` (see `CreditVerifier`), `past_dedup_horizon`
    /// (see `DedupHorizon`).
    public let code: String
    public let detail: String

    /// Every code a record can be set aside with: metrics start each at zero, so the first dead
    /// letter of a kind is an increase a rate or `increase()` sees.
    public static let codes = ["empty", "oversize", "malformed_json", "schema_invalid", "unknown_type",
                               "key_mismatch", "wrong_partition", "unsigned_credit", DedupHorizon.reasonCode]

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

    /// - Parameters:
    ///   - key: the record key, which must be the event's customer id: one partition must hold a
    ///     customer's whole history (invariant 3), or its order, dedup and wallet would depend on
    ///     how partitions interleave. Nil skips the check (tools reading values alone).
    ///   - placement: the record's partition, the topic's partition count and the partitioner
    ///     producers must use; a keyed record on another partition than its key's is poison
    ///     (`wrong_partition`), so a customer is never billed from two partitions. Nil skips it.
    ///   - binaryMode: the `ce_` attribute headers (prefix removed) and `content-type` of a record
    ///     in CloudEvents binary mode, whose value is then the event's data.
    public static func classify(_ value: [UInt8]?, key: [UInt8]?? = nil, placement: RecordPlacement? = nil,
                                binaryMode: (attributes: [(name: String, value: String)], contentType: String?)? = nil) -> ClassifiedRecord {
        guard let value, !value.isEmpty else { return .poison(PoisonReason(code: "empty", detail: "record has no value")) }
        if value.count > EventLimits.maxEventBytes {
            return .poison(PoisonReason(code: "oversize", detail: "record is \(value.count) bytes; events are at most \(EventLimits.maxEventBytes)"))
        }
        let decoded = binaryMode.map {
            BinaryModeEvent.decode(attributes: $0.attributes, contentType: $0.contentType, data: value, binding: .kafka)
        } ?? EventDecoder.decode(value)
        switch decoded {
        case .success(let event):
            if let key, !(key.map { $0.elementsEqual(event.customerID.utf8) } ?? false) {
                let shown = key.map { String(decoding: $0.prefix(256), as: UTF8.self) } ?? "no key"
                return .poison(PoisonReason(code: "key_mismatch", detail: "record key (\(shown)) is not the event's customer id \(event.customerID); producers must key records by customer"))
            }
            if let placement, let wrong = placement.misplacement(of: event.customerID) { return .poison(wrong) }
            return .event(event)
        case .failure(let error): return .poison(PoisonReason(code: error.reasonCode, detail: error.description))
        }
    }
}

/// Where a record was read and how its key should have been placed.
public struct RecordPlacement: Sendable, Equatable {
    public let partition: Int32
    public let partitions: Int32
    public let partitioner: KeyPartitioner

    public init(partition: Int32, partitions: Int32, partitioner: KeyPartitioner) {
        self.partition = partition
        self.partitions = partitions
        self.partitioner = partitioner
    }

    /// Nil when `customerID`'s partition is this one; otherwise the reason the record is set aside.
    public func misplacement(of customerID: String) -> PoisonReason? {
        guard partitions > 0 else { return nil }
        let expected = partitioner.partition(of: customerID.utf8, partitions: partitions)
        guard expected != partition else { return nil }
        return PoisonReason(code: "wrong_partition", detail: """
            customer \(customerID) belongs on partition \(expected) of \(partitions) by the \(partitioner.rawValue) partitioner \
            (librdkafka partitioner=\(partitioner.librdkafkaName)), not on \(partition): a customer's records must share one \
            partition. Nothing of this record was counted; produce it again with that partitioner (its id is deduplicated)
            """)
    }
}
