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
        guard !headers.isEmpty, headers.contains(where: { $0.name == "ce_specversion" }) else {
            return ClassifiedRecord.classify(value, key: .some(key), placement: placement)
        }
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
        // A `content-type` of application/cloudevents… means structured mode, headers or not (Kafka binding §3.1).
        if contentType?.lowercased().hasPrefix("application/cloudevents") == true {
            return ClassifiedRecord.classify(value, key: .some(key), placement: placement)
        }
        return ClassifiedRecord.classify(value, key: .some(key), placement: placement, binaryMode: (attributes, contentType))
    }
}
