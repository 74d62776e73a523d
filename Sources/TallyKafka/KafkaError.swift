import CRdKafka

/// An error from the Kafka client, with a stable code and a retryable flag.
///
/// The description never contains record keys or values (tenant data).
public struct KafkaError: Error, CustomStringConvertible, Sendable {
    /// What went wrong, extensible without breaking callers.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        public static let configuration = Code("configuration")
        public static let clientCreation = Code("client_creation")
        public static let produce = Code("produce")
        /// The broker did not take the record: it is not in the log.
        public static let delivery = Code("delivery")
        /// No answer in time after the record was sent: it may or may not be in the log (librdkafka's
        /// `RD_KAFKA_MSG_STATUS_POSSIBLY_PERSISTED`). Resending it with the same event id is safe.
        public static let deliveryUnknown = Code("delivery_unknown")
        public static let consume = Code("consume")
        public static let rebalance = Code("rebalance")
        public static let seek = Code("seek")
        public static let query = Code("query")
        public static let admin = Code("admin")
        public static let timeout = Code("timeout")
        public static let closed = Code("closed")
    }

    public let code: Code
    public let reason: String
    /// The librdkafka error code, when one caused this error.
    public let rdKafkaCode: Int32?
    /// True when trying the same operation again later may succeed.
    public let isRetryable: Bool
    public let file: String
    public let line: UInt

    public var description: String {
        var text = "KafkaError(\(code)): \(reason)"
        if let rdKafkaCode { text += " [rd_kafka \(rdKafkaCode)]" }
        return text
    }

    init(code: Code, reason: String, rdKafkaCode: Int32? = nil, isRetryable: Bool,
         file: String = #fileID, line: UInt = #line) {
        self.code = code
        self.reason = reason
        self.rdKafkaCode = rdKafkaCode
        self.isRetryable = isRetryable
        self.file = file
        self.line = line
    }

    static func rdKafka(_ err: rd_kafka_resp_err_t, code: Code, context: String,
                        file: String = #fileID, line: UInt = #line) -> KafkaError {
        let reason = "\(context): \(String(cString: rd_kafka_err2str(err)))"
        return KafkaError(code: code, reason: reason, rdKafkaCode: err.rawValue,
                          isRetryable: isTransient(err), file: file, line: line)
    }

    static func rdKafka(error: OpaquePointer, code: Code, context: String,
                        file: String = #fileID, line: UInt = #line) -> KafkaError {
        let message = String(cString: rd_kafka_error_string(error))
        let retryable = rd_kafka_error_is_retriable(error) != 0
        let raw = rd_kafka_error_code(error).rawValue
        rd_kafka_error_destroy(error)
        return KafkaError(code: code, reason: "\(context): \(message)", rdKafkaCode: raw,
                          isRetryable: retryable, file: file, line: line)
    }

    static func configuration(_ reason: String, file: String = #fileID, line: UInt = #line) -> KafkaError {
        KafkaError(code: .configuration, reason: reason, isRetryable: false, file: file, line: line)
    }

    static func closed(file: String = #fileID, line: UInt = #line) -> KafkaError {
        KafkaError(code: .closed, reason: "the client is closed", isRetryable: false, file: file, line: line)
    }

    /// The client can no longer be used and must be recreated.
    public var requiresNewClient: Bool {
        rdKafkaCode == RD_KAFKA_RESP_ERR__FATAL.rawValue || rdKafkaCode == RD_KAFKA_RESP_ERR_PRODUCER_FENCED.rawValue
            || rdKafkaCode == RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH.rawValue
    }

    /// Errors a broker outage or a slow broker produces; the write may succeed when retried.
    static func isTransient(_ err: rd_kafka_resp_err_t) -> Bool {
        switch err {
        case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT, RD_KAFKA_RESP_ERR__TIMED_OUT,
             RD_KAFKA_RESP_ERR__TRANSPORT, RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN,
             RD_KAFKA_RESP_ERR__QUEUE_FULL, RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
             RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
             RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION, RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE,
             RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE, RD_KAFKA_RESP_ERR_NOT_COORDINATOR:
            return true
        default:
            return false
        }
    }
}
