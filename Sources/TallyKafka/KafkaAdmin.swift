import CRdKafka
import Foundation
import Logging

/// Metadata look-ups shared by the clients.
enum KafkaMetadata {
    static func partitionCount(_ handle: KafkaHandle, topic: String, timeout: Duration) throws(KafkaError) -> Int {
        var metadata: UnsafePointer<rd_kafka_metadata>?
        // all_topics=1 so that asking never auto-creates the topic.
        let err = rd_kafka_metadata(handle.pointer, 1, nil, &metadata, Int32(clamping: timeout.milliseconds))
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR, let metadata else {
            throw KafkaError.rdKafka(err, code: .query, context: "metadata")
        }
        defer { rd_kafka_metadata_destroy(metadata) }
        for index in 0..<Int(metadata.pointee.topic_cnt) {
            let entry = metadata.pointee.topics[index]
            if String(cString: entry.topic) == topic, entry.err == RD_KAFKA_RESP_ERR_NO_ERROR {
                return Int(entry.partition_cnt)
            }
        }
        throw KafkaError(code: .query, reason: "topic \(topic) does not exist", isRetryable: true)
    }

    static func queryWatermarks(_ handle: KafkaHandle, _ partition: TopicPartition, timeout: Duration) throws(KafkaError) -> Watermarks {
        var low: Int64 = -1
        var high: Int64 = -1
        let err = rd_kafka_query_watermark_offsets(handle.pointer, partition.topic, partition.partition,
                                                   &low, &high, Int32(clamping: timeout.milliseconds))
        if err != RD_KAFKA_RESP_ERR_NO_ERROR {
            throw KafkaError.rdKafka(err, code: .query, context: "watermarks of \(partition)")
        }
        return Watermarks(low: low, high: high)
    }
}

/// Topic administration: creation and partition counts.
public final class KafkaAdmin: @unchecked Sendable {
    private let handle: KafkaHandle
    private let context: ClientContext

    public init(configuration: KafkaConfiguration, logger: Logger) throws(KafkaError) {
        let conf = try configuration.makeConf()
        context = ClientContext(logger: logger)
        context.install(on: conf)
        let rk = try makeClient(RD_KAFKA_PRODUCER, conf: conf)
        handle = KafkaHandle(pointer: rk)
    }

    deinit {
        rd_kafka_destroy(handle.pointer)
    }

    /// Creates the topic; returns false when it already existed (which is fine: `up` is idempotent).
    @discardableResult
    public func createTopic(_ name: String, partitions: Int, replicationFactor: Int = 1,
                            config: [String: String] = [:], timeout: Duration = .seconds(30)) throws(KafkaError) -> Bool {
        var errorText = [CChar](repeating: 0, count: 512)
        guard let newTopic = rd_kafka_NewTopic_new(name, Int32(partitions), Int32(replicationFactor), &errorText, errorText.count) else {
            let reason = errorText.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            throw KafkaError(code: .admin, reason: "topic \(name): \(reason)", isRetryable: false)
        }
        defer { rd_kafka_NewTopic_destroy(newTopic) }
        for (key, value) in config.sorted(by: { $0.key < $1.key }) {
            let err = rd_kafka_NewTopic_set_config(newTopic, key, value)
            if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError.rdKafka(err, code: .admin, context: "topic config \(key)") }
        }
        let queue = rd_kafka_queue_new(handle.pointer)
        defer { rd_kafka_queue_destroy(queue) }
        var topics: [OpaquePointer?] = [newTopic]
        rd_kafka_CreateTopics(handle.pointer, &topics, 1, nil, queue)
        guard let event = rd_kafka_queue_poll(queue, Int32(clamping: timeout.milliseconds)) else {
            throw KafkaError(code: .timeout, reason: "create topic \(name) timed out", isRetryable: true)
        }
        defer { rd_kafka_event_destroy(event) }
        let eventError = rd_kafka_event_error(event)
        if eventError != RD_KAFKA_RESP_ERR_NO_ERROR {
            throw KafkaError.rdKafka(eventError, code: .admin, context: "create topic \(name)")
        }
        guard let result = rd_kafka_event_CreateTopics_result(event) else {
            throw KafkaError(code: .admin, reason: "create topic \(name): no result", isRetryable: true)
        }
        var count = 0
        guard let results = rd_kafka_CreateTopics_result_topics(result, &count), count > 0 else {
            throw KafkaError(code: .admin, reason: "create topic \(name): empty result", isRetryable: true)
        }
        let err = rd_kafka_topic_result_error(results[0])
        if err == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS { return false }
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError.rdKafka(err, code: .admin, context: "create topic \(name)") }
        return true
    }

    /// Number of partitions of `topic`.
    public func partitionCount(of topic: String, timeout: Duration = .seconds(10)) throws(KafkaError) -> Int {
        try KafkaMetadata.partitionCount(handle, topic: topic, timeout: timeout)
    }

    /// True when the broker answers metadata for `topic`; the wait runs off the caller's thread,
    /// so an async server can ask from its event loop.
    public func topicIsReachable(_ topic: String, timeout: Duration = .seconds(2)) async -> Bool {
        let handle = self.handle
        return (try? await runBlocking { try KafkaMetadata.partitionCount(handle, topic: topic, timeout: timeout) }) != nil
    }

    /// Watermarks as the broker answers them (see `KafkaConsumer.queryWatermarks` on Tansu).
    public func queryWatermarks(_ partition: TopicPartition, timeout: Duration = .seconds(10)) throws(KafkaError) -> Watermarks {
        try KafkaMetadata.queryWatermarks(handle, partition, timeout: timeout)
    }
}
