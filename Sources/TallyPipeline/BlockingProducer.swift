import Foundation
import Logging
import TallyKafka

/// A producer for threads that must wait for acknowledgements (consumer loops, the alert relay).
/// Replaces its client when it turns fatal or fenced: an idempotent producer in that state
/// fails every later send.
public final class BlockingProducer: @unchecked Sendable {
    private var producer: KafkaProducer
    private let configuration: KafkaConfiguration
    private let logger: Logger

    public init(configuration: KafkaConfiguration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        producer = try KafkaProducer(configuration: configuration, logger: logger)
    }

    /// Sends until every record is acknowledged, retrying failures every 0.5 s.
    /// Returns false when `shouldStop` turned true before that.
    public func sendAll(_ records: [ProducerRecord], what: String, shouldStop: () -> Bool) -> Bool {
        var pending = records
        while !pending.isEmpty {
            let results = send(pending)
            let failed = zip(pending, results).compactMap { record, result -> (ProducerRecord, KafkaError)? in
                if case .failure(let error) = result { return (record, error) } else { return nil }
            }
            if failed.isEmpty { return true }
            logger.warning("\(what) failed (\(failed.count) records), retrying: \(failed[0].1)")
            if producer.hasFatalError || failed.contains(where: { $0.1.requiresNewClient }) {
                if let fresh = try? KafkaProducer(configuration: configuration, logger: logger) { producer = fresh }
            }
            if shouldStop() { return false }
            Thread.sleep(forTimeInterval: 0.5)
            pending = failed.map(\.0)
        }
        return true
    }

    private func send(_ records: [ProducerRecord]) -> [Result<DeliveryReport, KafkaError>] {
        final class Box: @unchecked Sendable { var results: [Result<DeliveryReport, KafkaError>] = [] }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        let producer = self.producer
        Task {
            box.results = await producer.send(records)
            done.signal()
        }
        done.wait()
        return box.results
    }
}
