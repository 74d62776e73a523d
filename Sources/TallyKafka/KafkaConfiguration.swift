import CRdKafka

/// librdkafka properties, applied when a client is created.
///
/// Tally sets the properties its invariants need (idempotence, acks, manual
/// offsets); anything else is passed through unchanged, so operators can tune
/// the client with the names documented in librdkafka's CONFIGURATION.md.
public struct KafkaConfiguration: Sendable {
    public private(set) var properties: [String: String]

    public init(brokers: String, properties: [String: String] = [:]) {
        self.properties = properties
        self.properties["bootstrap.servers"] = brokers
    }

    public subscript(key: String) -> String? {
        get { properties[key] }
        set { properties[key] = newValue }
    }

    /// This configuration for a consumer group member: `session.timeout.ms` set to
    /// `sessionTimeoutMs` unless given, and unless the group uses Kafka 4's consumer protocol
    /// (KIP-848, `group.protocol=consumer`): there the broker owns the session timeout
    /// (`group.consumer.session.timeout.ms`) and librdkafka refuses the property.
    public func groupMember(sessionTimeoutMs: Int) -> KafkaConfiguration {
        var copy = self
        if copy["group.protocol"] != "consumer" && copy["session.timeout.ms"] == nil {
            copy["session.timeout.ms"] = String(sessionTimeoutMs)
            // Three heartbeats per session, as Kafka advises (librdkafka's default of 3 s would leave one).
            if copy["heartbeat.interval.ms"] == nil { copy["heartbeat.interval.ms"] = String(max(1, sessionTimeoutMs / 3)) }
        }
        return copy
    }

    /// Properties only a consumer reads: a producer made from a consumer's configuration (the
    /// dead-letter producer) leaves them out rather than warn about each.
    static let consumerOnly: Set<String> = [
        "session.timeout.ms", "heartbeat.interval.ms", "group.protocol", "group.remote.assignor", "partition.assignment.strategy",
        "group.instance.id", "max.poll.interval.ms", "auto.offset.reset", "fetch.queue.backoff.ms", "enable.auto.commit",
        "enable.auto.offset.store", "isolation.level",
    ]

    /// Builds an `rd_kafka_conf_t`; the caller owns it until it is passed to `rd_kafka_new`.
    func makeConf() throws(KafkaError) -> OpaquePointer {
        guard let conf = rd_kafka_conf_new() else {
            throw KafkaError.configuration("rd_kafka_conf_new failed")
        }
        var errorText = [CChar](repeating: 0, count: 512)
        for (key, value) in properties.sorted(by: { $0.key < $1.key }) {
            let result = rd_kafka_conf_set(conf, key, value, &errorText, errorText.count)
            if result != RD_KAFKA_CONF_OK {
                rd_kafka_conf_destroy(conf)
                let reason = errorText.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
                throw KafkaError.configuration("\(key): \(reason)")
            }
        }
        return conf
    }
}

/// One partition of one topic.
public struct TopicPartition: Hashable, Sendable, CustomStringConvertible {
    public let topic: String
    public let partition: Int32

    public init(_ topic: String, _ partition: Int32) {
        self.topic = topic
        self.partition = partition
    }

    public var description: String { "\(topic)[\(partition)]" }
}

/// A record header. Kafka allows repeated names and null values.
public struct KafkaHeader: Hashable, Sendable {
    public let name: String
    public let value: [UInt8]?

    public init(_ name: String, _ value: [UInt8]?) {
        self.name = name
        self.value = value
    }

    public init(_ name: String, string: String) {
        self.name = name
        self.value = Array(string.utf8)
    }
}

/// Low and high watermark of a partition: the first retained offset and the log end offset.
public struct Watermarks: Hashable, Sendable {
    public let low: Int64
    public let high: Int64

    public init(low: Int64, high: Int64) {
        self.low = low
        self.high = high
    }
}

/// Helpers for `rd_kafka_topic_partition_list_t`, which never leaves this target.
enum PartitionList {
    static func make(_ partitions: [TopicPartition], offsets: [TopicPartition: Int64] = [:])
        -> UnsafeMutablePointer<rd_kafka_topic_partition_list_t>
    {
        let list = rd_kafka_topic_partition_list_new(Int32(max(partitions.count, 1)))!
        for partition in partitions {
            let element = rd_kafka_topic_partition_list_add(list, partition.topic, partition.partition)!
            element.pointee.offset = offsets[partition] ?? Int64(RD_KAFKA_OFFSET_INVALID)
        }
        return list
    }

    static func read(_ list: UnsafePointer<rd_kafka_topic_partition_list_t>)
        -> [(partition: TopicPartition, offset: Int64, error: rd_kafka_resp_err_t)]
    {
        var out: [(TopicPartition, Int64, rd_kafka_resp_err_t)] = []
        out.reserveCapacity(Int(list.pointee.cnt))
        for index in 0..<Int(list.pointee.cnt) {
            let element = list.pointee.elems[index]
            out.append((TopicPartition(String(cString: element.topic), element.partition), element.offset, element.err))
        }
        return out
    }
}
