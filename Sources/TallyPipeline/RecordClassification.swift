import TallyCore
import TallyKafka

extension ConsumerRecord {
    /// What the consumers make of this record: an event, or poison with its reason. A record with
    /// a `ce_specversion` header is a CloudEvent in Kafka binary mode (attributes in `ce_` headers,
    /// `content-type` the data's media type, the value the data).
    ///
    /// - Parameter partitions: the topic's partition count, to check the record is where its customer
    ///   belongs (`wrong_partition` otherwise); nil skips the check.
    public func classified(partitions: Int32?, partitioner: KeyPartitioner) -> ClassifiedRecord {
        let placement = partitions.map { RecordPlacement(partition: partition, partitions: $0, partitioner: partitioner) }
        guard isBinaryModeCloudEvent else { return ClassifiedRecord.classify(value, key: .some(key), placement: placement) }
        var attributes: [(name: String, value: String)] = []
        var contentType: String?
        for header in headers {
            let text = header.value.map { String(decoding: $0, as: UTF8.self) } ?? ""
            if header.name.hasPrefix("ce_") {
                attributes.append((String(header.name.dropFirst(3)), text))
            } else if header.name.lowercased() == "content-type" {
                contentType = text
            }
        }
        return ClassifiedRecord.classify(value, key: .some(key), placement: placement, binaryMode: (attributes, contentType))
    }

    /// A CloudEvent in Kafka binary mode: a `ce_specversion` header and no `content-type` of
    /// application/cloudevents… (which means structured mode, headers or not: Kafka binding §3.1).
    public var isBinaryModeCloudEvent: Bool {
        guard !headers.isEmpty, headers.contains(where: { $0.name == "ce_specversion" }) else { return false }
        let contentType = headers.last(where: { $0.name.lowercased() == "content-type" })?.value
        return !(contentType.map { String(decoding: $0, as: UTF8.self).lowercased().hasPrefix("application/cloudevents") } ?? false)
    }
}

extension ProducerRecord {
    /// A credit record (an encoded grant or void) keyed by its customer and signed with the
    /// keyring's `sign` key (see `CreditKeyring`); nil when the keyring has none.
    public static func signedCredit(topic: String, customerID: String, value: [UInt8], keyring: CreditKeyring) -> ProducerRecord? {
        let key = Array(customerID.utf8)
        guard let signature = keyring.signature(topic: topic, key: key, value: value) else { return nil }
        return ProducerRecord(topic: topic, key: key, value: value, headers: [KafkaHeader(CreditKeyring.headerName, signature)])
    }
}
