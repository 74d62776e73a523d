import CRdKafka
import Foundation
import Logging

/// State the C callbacks need, recovered from librdkafka's opaque pointer.
///
/// Retain rule: the owning client (`KafkaProducer`, `KafkaConsumer`, `KafkaAdmin`)
/// holds the only strong reference and passes it unretained as the opaque. It
/// destroys the `rd_kafka_t` (which stops every callback) before it releases
/// the context, so the callbacks never see a dangling pointer.
final class ClientContext: @unchecked Sendable {
    let logger: Logger
    /// Set by the consumer; called on the consumer's polling thread only.
    var rebalance: ((RebalanceEvent) -> [TopicPartition: Int64])?

    init(logger: Logger) {
        self.logger = logger
    }

    static func from(_ rk: OpaquePointer?) -> ClientContext? {
        guard let rk, let opaque = rd_kafka_opaque(rk) else { return nil }
        return Unmanaged<ClientContext>.fromOpaque(opaque).takeUnretainedValue()
    }

    /// Installs the log and error callbacks that route librdkafka's messages into `logger`.
    func install(on conf: OpaquePointer) {
        rd_kafka_conf_set_opaque(conf, Unmanaged.passUnretained(self).toOpaque())
        rd_kafka_conf_set_log_cb(conf) { rk, level, facility, message in
            guard let context = ClientContext.from(rk), let message else { return }
            let text = String(cString: message)
            let facilityText = facility.map { String(cString: $0) } ?? ""
            // syslog levels: 0-3 error, 4 warning, 5-6 info/notice, 7 debug.
            let logLevel: Logger.Level = level <= 3 ? .error : level == 4 ? .warning : level <= 6 ? .info : .debug
            context.logger.log(level: logLevel, "\(text)", metadata: [LogKey.kafkaFacility: "\(facilityText)"])
        }
        rd_kafka_conf_set_error_cb(conf) { rk, err, reason, _ in
            guard let context = ClientContext.from(rk) else { return }
            let text = reason.map { String(cString: $0) } ?? ""
            let error = rd_kafka_resp_err_t(rawValue: err)
            // Transport errors are routine during broker restarts; librdkafka retries them itself.
            let level: Logger.Level = error == RD_KAFKA_RESP_ERR__FATAL ? .critical : .warning
            context.logger.log(level: level, "kafka client error: \(text)", metadata: [LogKey.kafkaError: "\(err)"])
        }
    }
}

/// Metadata keys used in Kafka log lines.
public enum LogKey {
    public static let kafkaFacility = "kafka.facility"
    public static let kafkaError = "kafka.error"
    public static let kafkaTopic = "kafka.topic"
    public static let kafkaPartition = "kafka.partition"
    public static let kafkaOffset = "kafka.offset"
}

/// Creates an `rd_kafka_t`; on failure destroys `conf` and throws librdkafka's reason.
func makeClient(_ type: rd_kafka_type_t, conf: OpaquePointer) throws(KafkaError) -> OpaquePointer {
    var errorText = [CChar](repeating: 0, count: 512)
    guard let rk = rd_kafka_new(type, conf, &errorText, errorText.count) else {
        rd_kafka_conf_destroy(conf)
        let reason = errorText.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        throw KafkaError(code: .clientCreation, reason: reason, isRetryable: false)
    }
    return rk
}

/// Runs a blocking C call off Swift's cooperative thread pool.
func runBlocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async {
            continuation.resume(with: Result { try body() })
        }
    }
}

/// A thread that serves a client's callbacks until it is stopped.
final class PollThread: @unchecked Sendable {
    private let lock = NSLock()
    private var running = true
    private let finished = DispatchSemaphore(value: 0)

    init(name: String, poll: @escaping @Sendable () -> Void) {
        let thread = Thread { [self] in
            while isRunning { poll() }
            finished.signal()
        }
        thread.name = name
        thread.start()
    }

    private var isRunning: Bool {
        lock.lock(); defer { lock.unlock() }
        return running
    }

    /// Stops the loop and waits for the current poll to return.
    func stop() {
        lock.lock()
        let wasRunning = running
        running = false
        lock.unlock()
        if wasRunning { finished.wait() }
    }
}

/// An `rd_kafka_t` pointer, safe to hand to a thread because librdkafka handles are thread-safe.
struct KafkaHandle: @unchecked Sendable {
    let pointer: OpaquePointer
}
