import CRdKafka
import Foundation
import Logging

/// A record to publish.
public struct ProducerRecord: Sendable {
    public var topic: String
    public var key: [UInt8]?
    public var value: [UInt8]
    public var headers: [KafkaHeader]
    /// nil lets the partitioner choose from the key (murmur2 unless configured otherwise, as the Java client does).
    public var partition: Int32?
    /// The record's CreateTime in ms since the epoch; nil stamps it with the time it is produced.
    /// A topic with `message.timestamp.type=LogAppendTime` replaces either with the broker's.
    public var timestampMilliseconds: Int64?

    public init(topic: String, key: [UInt8]?, value: [UInt8], headers: [KafkaHeader] = [], partition: Int32? = nil,
                timestampMilliseconds: Int64? = nil) {
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.partition = partition
        self.timestampMilliseconds = timestampMilliseconds
    }
}

/// Where the broker stored an acknowledged record.
public struct DeliveryReport: Hashable, Sendable {
    public let partition: Int32
    public let offset: Int64
}

/// Collects the delivery reports of one `send` call and resumes its caller once all are in.
private final class DeliveryBatch: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Result<DeliveryReport, KafkaError>?]
    private var remaining: Int
    private var continuation: CheckedContinuation<[Result<DeliveryReport, KafkaError>], Never>?

    init(count: Int) {
        results = Array(repeating: nil, count: count)
        remaining = count
    }

    func wait(_ continuation: CheckedContinuation<[Result<DeliveryReport, KafkaError>], Never>) {
        lock.lock()
        if remaining == 0 {
            lock.unlock()
            continuation.resume(returning: results.map { $0! })
            return
        }
        self.continuation = continuation
        lock.unlock()
    }

    func complete(_ index: Int, _ result: Result<DeliveryReport, KafkaError>) {
        lock.lock()
        results[index] = result
        remaining -= 1
        guard remaining == 0, let continuation else { lock.unlock(); return }
        self.continuation = nil
        let all = results.map { $0! }
        lock.unlock()
        continuation.resume(returning: all)
    }
}

/// The per-message opaque: which batch, which slot. Retained once per produced message,
/// released by the delivery report callback (or by `send` when produce fails up front).
private final class DeliveryTicket {
    let batch: DeliveryBatch
    let index: Int
    init(batch: DeliveryBatch, index: Int) {
        self.batch = batch
        self.index = index
    }
}

/// An idempotent Kafka producer (acks=all) whose sends complete on the broker's acknowledgement.
///
/// A dedicated thread serves delivery reports. Records are copied into
/// librdkafka when produced, so callers may reuse their buffers at once.
///
/// - Important: a `send` returns `.success` for a record only after the broker
///   acknowledged it with all in-sync replicas; anything else is a failure the
///   caller must report, never swallow.
public final class KafkaProducer: @unchecked Sendable {
    private let handle: KafkaHandle
    private let context: ClientContext
    private let pollThread: PollThread
    private let lock = NSLock()
    private var closed = false

    public init(configuration: KafkaConfiguration, logger: Logger) throws(KafkaError) {
        var configuration = configuration
        for key in KafkaConfiguration.consumerOnly { configuration[key] = nil }
        // Invariant: an acknowledged record is written exactly once and durably.
        configuration["enable.idempotence"] = "true"
        configuration["acks"] = "all"
        if configuration["linger.ms"] == nil { configuration["linger.ms"] = "5" }
        // Kafka's Java-compatible key hashing, not librdkafka's CRC32 default: a customer's records
        // land on the partition every other client puts them on (ARCHITECTURE.md, invariant 3).
        if configuration["partitioner"] == nil { configuration["partitioner"] = "murmur2_random" }
        let conf = try configuration.makeConf()
        context = ClientContext(logger: logger)
        context.install(on: conf)
        rd_kafka_conf_set_dr_msg_cb(conf) { _, message, _ in
            guard let message, let opaque = message.pointee._private else { return }
            let ticket = Unmanaged<DeliveryTicket>.fromOpaque(opaque).takeRetainedValue()
            if message.pointee.err == RD_KAFKA_RESP_ERR_NO_ERROR {
                let report = DeliveryReport(partition: message.pointee.partition, offset: message.pointee.offset)
                ticket.batch.complete(ticket.index, .success(report))
            } else {
                // A record that reached the broker but timed out may still be written (a leader fail-over
                // can outlast the timeout): only NOT_PERSISTED means "not in the log".
                let persisted = rd_kafka_message_status(message) != RD_KAFKA_MSG_STATUS_NOT_PERSISTED
                let error = KafkaError.rdKafka(message.pointee.err, code: persisted ? .deliveryUnknown : .delivery,
                                               context: persisted ? "no acknowledgement; the record may be written" : "delivery failed")
                ticket.batch.complete(ticket.index, .failure(error))
            }
        }
        let rk = try makeClient(RD_KAFKA_PRODUCER, conf: conf)
        let handle = KafkaHandle(pointer: rk)
        self.handle = handle
        pollThread = PollThread(name: "tally.kafka.producer.poll") { _ = rd_kafka_poll(handle.pointer, 100) }
    }

    deinit {
        pollThread.stop()
        rd_kafka_destroy(handle.pointer)
    }

    /// Publishes one record and waits for the broker's acknowledgement.
    public func send(_ record: ProducerRecord) async throws(KafkaError) -> DeliveryReport {
        try await send([record])[0].get()
    }

    /// Publishes records in order and returns one result per record, in the same order.
    ///
    /// Records with the same key and partition keep their order in the log.
    public func send(_ records: [ProducerRecord]) async -> [Result<DeliveryReport, KafkaError>] {
        guard !records.isEmpty else { return [] }
        let batch = DeliveryBatch(count: records.count)
        if isClosed {
            for index in records.indices { batch.complete(index, .failure(.closed())) }
        } else {
            for (index, record) in records.enumerated() {
                let ticket = Unmanaged.passRetained(DeliveryTicket(batch: batch, index: index))
                while true {
                    let err = produce(record, opaque: ticket.toOpaque())
                    if err == RD_KAFKA_RESP_ERR_NO_ERROR { break }
                    if err == RD_KAFKA_RESP_ERR__QUEUE_FULL {
                        // The local queue drains as the broker acknowledges; wait for room.
                        try? await Task.sleep(for: .milliseconds(2))
                        continue
                    }
                    ticket.release()
                    batch.complete(index, .failure(.rdKafka(err, code: .produce, context: "produce to \(record.topic) rejected")))
                    break
                }
            }
        }
        return await withCheckedContinuation { batch.wait($0) }
    }

    private func produce(_ record: ProducerRecord, opaque: UnsafeMutableRawPointer) -> rd_kafka_resp_err_t {
        var headers: OpaquePointer?
        if !record.headers.isEmpty {
            headers = rd_kafka_headers_new(record.headers.count)
            for header in record.headers {
                if let value = header.value {
                    value.withUnsafeBytes { bytes in
                        _ = rd_kafka_header_add(headers, header.name, -1, bytes.baseAddress, bytes.count)
                    }
                } else {
                    _ = rd_kafka_header_add(headers, header.name, -1, nil, 0)
                }
            }
        }
        let partition = record.partition ?? RD_KAFKA_PARTITION_UA
        let err = record.value.withUnsafeBytes { value in
            withOptionalBytes(record.key) { key in
                tally_rd_kafka_produce(handle.pointer, record.topic, partition,
                                       key?.baseAddress, key?.count ?? 0,
                                       value.baseAddress, value.count, headers, record.timestampMilliseconds ?? 0, opaque)
            }
        }
        // librdkafka owns the headers only when produce succeeded.
        if err != RD_KAFKA_RESP_ERR_NO_ERROR, let headers { rd_kafka_headers_destroy(headers) }
        return err
    }

    /// Waits until every queued record is acknowledged or failed, up to `timeout`.
    public func flush(timeout: Duration = .seconds(30)) async throws(KafkaError) {
        let handle = self.handle
        let milliseconds = Int32(clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        let err: rd_kafka_resp_err_t
        do {
            err = try await runBlocking { rd_kafka_flush(handle.pointer, milliseconds) }
        } catch {
            throw KafkaError(code: .timeout, reason: "flush interrupted", isRetryable: true)
        }
        if err != RD_KAFKA_RESP_ERR_NO_ERROR {
            throw KafkaError.rdKafka(err, code: .timeout, context: "flush")
        }
    }

    /// The producer hit a fatal error (e.g. fenced after an idempotence epoch bump): it
    /// fails every send from now on, and the owner must replace it with a new one.
    public var hasFatalError: Bool {
        rd_kafka_fatal_error(handle.pointer, nil, 0) != RD_KAFKA_RESP_ERR_NO_ERROR
    }

    /// Records still waiting for an acknowledgement.
    public var outstandingCount: Int {
        Int(rd_kafka_outq_len(handle.pointer))
    }

    /// Flushes, then refuses further sends. Safe to call twice.
    public func close(flushTimeout: Duration = .seconds(30)) async {
        let wasClosed = lock.withLock {
            defer { closed = true }
            return closed
        }
        if !wasClosed { try? await flush(timeout: flushTimeout) }
    }

    private var isClosed: Bool {
        lock.withLock { closed }
    }
}

func withOptionalBytes<R>(_ bytes: [UInt8]?, _ body: (UnsafeRawBufferPointer?) -> R) -> R {
    guard let bytes else { return body(nil) }
    return bytes.withUnsafeBytes { body($0) }
}
