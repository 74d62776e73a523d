import CRdKafka
import Foundation
import Logging

/// One record read from a partition.
public struct ConsumerRecord: Sendable {
    public let topic: String
    public let partition: Int32
    public let offset: Int64
    public let key: [UInt8]?
    public let value: [UInt8]?
    public let headers: [KafkaHeader]
    /// Broker or producer timestamp in milliseconds since the epoch, when the record has one.
    public let timestampMilliseconds: Int64?

    public var topicPartition: TopicPartition { TopicPartition(topic, partition) }

    public init(topic: String, partition: Int32, offset: Int64, key: [UInt8]?, value: [UInt8]?,
                headers: [KafkaHeader] = [], timestampMilliseconds: Int64? = nil) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers
        self.timestampMilliseconds = timestampMilliseconds
    }

    public func header(_ name: String) -> [UInt8]? {
        headers.last(where: { $0.name == name })?.value ?? nil
    }
}

/// A change of the partitions this group member owns.
public enum RebalanceEvent: Sendable, Equatable {
    /// The partitions are now ours; the handler answers the offset to start each one from.
    case assigned([TopicPartition])
    /// The partitions are no longer ours. `lost` is true when they were taken
    /// without a clean handover (session timeout), so another member may already own them.
    case revoked([TopicPartition], lost: Bool)
}

/// Special offsets understood by `seek`, `assign` and rebalance answers.
public enum KafkaOffset {
    /// The earliest retained offset.
    public static let beginning = Int64(RD_KAFKA_OFFSET_BEGINNING)
    /// The log end.
    public static let end = Int64(RD_KAFKA_OFFSET_END)
    /// Kafka's committed offset, else `auto.offset.reset`.
    public static let stored = Int64(RD_KAFKA_OFFSET_INVALID)
}

/// A Kafka consumer that is driven from one thread: poll, process, store the position.
///
/// Tally keeps consumer positions in PostgreSQL, so Kafka's automatic commits
/// are off; `commitForMonitoring` publishes positions to the group for lag
/// tools only. The rebalance handler runs inside `poll` and `close`, on the
/// polling thread, and answers the starting offset of each assigned partition.
///
/// - Important: call `poll`, `seek`, `assign` and `close` from a single thread
///   (not Swift's cooperative pool: `poll` blocks up to its timeout).
public final class KafkaConsumer: @unchecked Sendable {
    private let handle: KafkaHandle
    private let queue: OpaquePointer
    private let context: ClientContext
    private var buffer: UnsafeMutablePointer<UnsafeMutablePointer<rd_kafka_message_t>?>
    private var bufferCapacity: Int
    private var closed = false
    public let logger: Logger

    /// Creates a consumer.
    ///
    /// - Parameters:
    ///   - groupID: the consumer group; nil for a consumer that only uses `assign`.
    ///   - onRebalance: answers, for `.assigned`, the offset to start each partition
    ///     at (`KafkaOffset.beginning` for "from the start"); a partition missing
    ///     from the answer starts at Kafka's committed offset. Called on the polling thread.
    public init(configuration: KafkaConfiguration, groupID: String?, logger: Logger,
                onRebalance: ((RebalanceEvent) -> [TopicPartition: Int64])? = nil) throws(KafkaError) {
        var configuration = configuration
        // librdkafka's consumer queue needs a group id even for assign-only readers;
        // those never join or commit, so a throwaway id is harmless.
        configuration["group.id"] = groupID ?? "tally-reader-\(UInt64.random(in: 0...UInt64.max))"
        // Positions live in PostgreSQL (invariant 1); Kafka commits are explicit and for lag only.
        configuration["enable.auto.commit"] = "false"
        // A producer property (Tally's settings carry it for every client); a consumer would warn.
        configuration["partitioner"] = nil
        configuration["enable.auto.offset.store"] = "false"
        if configuration["auto.offset.reset"] == nil { configuration["auto.offset.reset"] = "earliest" }
        // A consumer slower than the network fills librdkafka's prefetch queue; by default the
        // partition's next fetch then waits a whole second (librdkafka ≥ 2.1), and a backlog is read
        // in bursts with idle gaps between them (half the consumers' time in `scripts/bench`).
        if configuration["fetch.queue.backoff.ms"] == nil && rd_kafka_version() >= 0x0201_00ff {
            configuration["fetch.queue.backoff.ms"] = "10"
        }
        let conf = try configuration.makeConf()
        self.logger = logger
        context = ClientContext(logger: logger)
        context.rebalance = onRebalance
        context.install(on: conf)
        if groupID != nil {
            rd_kafka_conf_set_rebalance_cb(conf) { rk, err, partitions, _ in
                guard let rk, let partitions else { return }
                KafkaConsumer.handleRebalance(rk: rk, err: err, partitions: partitions)
            }
        }
        let rk = try makeClient(RD_KAFKA_CONSUMER, conf: conf)
        // Serve rebalance and error callbacks from the consumer queue, i.e. inside poll.
        rd_kafka_poll_set_consumer(rk)
        handle = KafkaHandle(pointer: rk)
        queue = rd_kafka_queue_get_consumer(rk)
        bufferCapacity = 1024
        buffer = .allocate(capacity: bufferCapacity)
    }

    deinit {
        if !closed { rd_kafka_consumer_close(handle.pointer) }
        rd_kafka_queue_destroy(queue)
        rd_kafka_destroy(handle.pointer)
        buffer.deallocate()
    }

    private static func handleRebalance(rk: OpaquePointer, err: rd_kafka_resp_err_t,
                                        partitions: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>) {
        guard let context = ClientContext.from(rk) else { return }
        let cooperative = String(cString: rd_kafka_rebalance_protocol(rk)) == "COOPERATIVE"
        let owned = PartitionList.read(partitions).map(\.partition)
        switch err {
        case RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS:
            let offsets = context.rebalance?(.assigned(owned)) ?? [:]
            for index in 0..<Int(partitions.pointee.cnt) {
                let element = partitions.pointee.elems[index]
                let partition = TopicPartition(String(cString: element.topic), element.partition)
                partitions.pointee.elems[index].offset = offsets[partition] ?? KafkaOffset.stored
            }
            if cooperative {
                if let error = rd_kafka_incremental_assign(rk, partitions) {
                    context.logger.error("incremental assign failed: \(KafkaError.rdKafka(error: error, code: .rebalance, context: "assign"))")
                }
            } else {
                let result = rd_kafka_assign(rk, partitions)
                if result != RD_KAFKA_RESP_ERR_NO_ERROR {
                    context.logger.error("assign failed: \(KafkaError.rdKafka(result, code: .rebalance, context: "assign"))")
                }
            }
        case RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS:
            let lost = rd_kafka_assignment_lost(rk) != 0
            _ = context.rebalance?(.revoked(owned, lost: lost))
            if cooperative {
                if let error = rd_kafka_incremental_unassign(rk, partitions) {
                    context.logger.error("incremental unassign failed: \(KafkaError.rdKafka(error: error, code: .rebalance, context: "unassign"))")
                }
            } else {
                _ = rd_kafka_assign(rk, nil)
            }
        default:
            context.logger.error("rebalance error: \(String(cString: rd_kafka_err2str(err)))")
            _ = context.rebalance?(.revoked(owned, lost: true))
            _ = rd_kafka_assign(rk, nil)
        }
    }

    /// Joins the group and subscribes to `topics` with `onRebalance` as the rebalance handler
    /// (replacing the one given at creation); assignments arrive through `poll`.
    public func subscribe(_ topics: [String], onRebalance: @escaping (RebalanceEvent) -> [TopicPartition: Int64]) throws(KafkaError) {
        context.rebalance = onRebalance
        try subscribe(topics)
    }

    /// Joins the group and subscribes to `topics`; assignments arrive through `poll`.
    public func subscribe(_ topics: [String]) throws(KafkaError) {
        let list = PartitionList.make(topics.map { TopicPartition($0, RD_KAFKA_PARTITION_UA) })
        defer { rd_kafka_topic_partition_list_destroy(list) }
        let err = rd_kafka_subscribe(handle.pointer, list)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError.rdKafka(err, code: .consume, context: "subscribe") }
    }

    /// Takes partitions directly, outside any group, starting at the given offsets.
    public func assign(_ offsets: [TopicPartition: Int64]) throws(KafkaError) {
        let list = PartitionList.make(Array(offsets.keys), offsets: offsets)
        defer { rd_kafka_topic_partition_list_destroy(list) }
        let err = rd_kafka_assign(handle.pointer, list)
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError.rdKafka(err, code: .consume, context: "assign") }
    }

    /// Waits up to `timeout` for records and returns at most `maxRecords` of them.
    ///
    /// Serves rebalance callbacks too, so a batch may end early at a rebalance.
    /// Per-partition errors are logged and skipped, so one bad partition never stalls the rest.
    public func poll(maxRecords: Int, timeout: Duration) -> [ConsumerRecord] {
        if maxRecords > bufferCapacity {
            buffer.deallocate()
            bufferCapacity = maxRecords
            buffer = .allocate(capacity: bufferCapacity)
        }
        let count = rd_kafka_consume_batch_queue(queue, Int32(clamping: timeout.milliseconds), buffer, maxRecords)
        guard count > 0 else { return [] }
        var records: [ConsumerRecord] = []
        records.reserveCapacity(count)
        for index in 0..<count {
            guard let message = buffer[index] else { continue }
            defer { rd_kafka_message_destroy(message) }
            let err = message.pointee.err
            if err != RD_KAFKA_RESP_ERR_NO_ERROR {
                if err != RD_KAFKA_RESP_ERR__PARTITION_EOF {
                    logger.warning("consume error: \(String(cString: rd_kafka_err2str(err)))",
                                   metadata: [LogKey.kafkaPartition: "\(message.pointee.partition)"])
                }
                continue
            }
            records.append(Self.copy(message))
        }
        return records
    }

    private static func copy(_ message: UnsafeMutablePointer<rd_kafka_message_t>) -> ConsumerRecord {
        let m = message.pointee
        let topic = String(cString: rd_kafka_topic_name(m.rkt))
        let key = m.key.map { Array(UnsafeRawBufferPointer(start: $0, count: m.key_len)) }
        let value = m.payload.map { Array(UnsafeRawBufferPointer(start: $0, count: m.len)) }
        var headers: [KafkaHeader] = []
        var headerList: OpaquePointer?
        if rd_kafka_message_headers(message, &headerList) == RD_KAFKA_RESP_ERR_NO_ERROR, let headerList {
            var index = 0
            var name: UnsafePointer<CChar>?
            var valuePointer: UnsafeRawPointer?
            var size = 0
            while rd_kafka_header_get_all(headerList, index, &name, &valuePointer, &size) == RD_KAFKA_RESP_ERR_NO_ERROR {
                let headerValue = valuePointer.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) }
                headers.append(KafkaHeader(name.map { String(cString: $0) } ?? "", headerValue))
                index += 1
            }
        }
        var timestampType = RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
        let timestamp = rd_kafka_message_timestamp(message, &timestampType)
        return ConsumerRecord(topic: topic, partition: m.partition, offset: m.offset, key: key, value: value,
                              headers: headers, timestampMilliseconds: timestamp >= 0 ? timestamp : nil)
    }

    /// Moves the fetch position of assigned partitions.
    public func seek(_ offsets: [TopicPartition: Int64], timeout: Duration = .seconds(10)) throws(KafkaError) {
        let list = PartitionList.make(Array(offsets.keys), offsets: offsets)
        defer { rd_kafka_topic_partition_list_destroy(list) }
        if let error = rd_kafka_seek_partitions(handle.pointer, list, Int32(clamping: timeout.milliseconds)) {
            throw KafkaError.rdKafka(error: error, code: .seek, context: "seek")
        }
        for entry in PartitionList.read(list) where entry.error != RD_KAFKA_RESP_ERR_NO_ERROR {
            throw KafkaError.rdKafka(entry.error, code: .seek, context: "seek \(entry.partition)")
        }
    }

    /// Stops fetching from the partitions until `resume`.
    public func pause(_ partitions: [TopicPartition]) {
        let list = PartitionList.make(partitions)
        defer { rd_kafka_topic_partition_list_destroy(list) }
        _ = rd_kafka_pause_partitions(handle.pointer, list)
    }

    public func resume(_ partitions: [TopicPartition]) {
        let list = PartitionList.make(partitions)
        defer { rd_kafka_topic_partition_list_destroy(list) }
        _ = rd_kafka_resume_partitions(handle.pointer, list)
    }

    /// The partitions currently assigned to this member.
    public func assignment() throws(KafkaError) -> [TopicPartition] {
        var list: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?
        let err = rd_kafka_assignment(handle.pointer, &list)
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR, let list else {
            throw KafkaError.rdKafka(err, code: .consume, context: "assignment")
        }
        defer { rd_kafka_topic_partition_list_destroy(list) }
        return PartitionList.read(list).map(\.partition)
    }

    /// Publishes positions to the group, asynchronously, so lag tools can read them.
    ///
    /// Never used to resume: Tally's positions come from PostgreSQL.
    public func commitForMonitoring(_ offsets: [TopicPartition: Int64]) {
        guard !offsets.isEmpty else { return }
        let list = PartitionList.make(Array(offsets.keys), offsets: offsets)
        defer { rd_kafka_topic_partition_list_destroy(list) }
        _ = rd_kafka_commit(handle.pointer, list, 1)
    }

    /// Offsets committed to Kafka for the partitions (nil where none is committed).
    public func committedOffsets(_ partitions: [TopicPartition], timeout: Duration = .seconds(10)) throws(KafkaError) -> [TopicPartition: Int64?] {
        let list = PartitionList.make(partitions)
        defer { rd_kafka_topic_partition_list_destroy(list) }
        let err = rd_kafka_committed(handle.pointer, list, Int32(clamping: timeout.milliseconds))
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError.rdKafka(err, code: .query, context: "committed offsets") }
        var result: [TopicPartition: Int64?] = [:]
        for entry in PartitionList.read(list) { result[entry.partition] = entry.offset >= 0 ? entry.offset : nil }
        return result
    }

    /// Asks the partition leader for the watermarks.
    ///
    /// - Important: Tansu answers the base offset of the last batch + 1 as the
    ///   high watermark; use `cachedWatermarks` (from fetch responses) to decide
    ///   "caught up" on a partition this consumer fetches.
    public func queryWatermarks(_ partition: TopicPartition, timeout: Duration = .seconds(10)) throws(KafkaError) -> Watermarks {
        try KafkaMetadata.queryWatermarks(handle, partition, timeout: timeout)
    }

    /// The watermarks seen in the last fetch response, without a broker round trip.
    public func cachedWatermarks(_ partition: TopicPartition) -> Watermarks? {
        var low: Int64 = -1
        var high: Int64 = -1
        let err = rd_kafka_get_watermark_offsets(handle.pointer, partition.topic, partition.partition, &low, &high)
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR, high >= 0 else { return nil }
        return Watermarks(low: low, high: high)
    }

    /// Number of partitions of `topic`.
    public func partitionCount(of topic: String, timeout: Duration = .seconds(10)) throws(KafkaError) -> Int {
        try KafkaMetadata.partitionCount(handle, topic: topic, timeout: timeout)
    }

    /// Leaves the group (the rebalance handler sees the revocation) and stops fetching.
    public func close() {
        guard !closed else { return }
        closed = true
        _ = rd_kafka_consumer_close(handle.pointer)
    }
}

extension Duration {
    var milliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }
}
