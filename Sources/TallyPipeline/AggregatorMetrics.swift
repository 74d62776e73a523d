import Foundation
import Metrics

/// The aggregator's metrics, created once. Labels are never customer ids.
final class AggregatorMetrics: @unchecked Sendable {
    let records = Counter(label: "tally_aggregator_records_total")
    let accepted = Counter(label: "tally_aggregator_events_accepted_total")
    let duplicates = Counter(label: "tally_aggregator_duplicates_total")
    let conflicts = Counter(label: "tally_aggregator_conflicts_total")
    let deadLetters = Counter(label: "tally_aggregator_dead_letters_total")
    let fencedBatches = Counter(label: "tally_aggregator_fenced_batches_total")
    let batchRecords = Recorder(label: "tally_aggregator_batch_records")
    let transactionSeconds = Metrics.Timer(label: "tally_aggregator_transaction_seconds")
    private let lock = NSLock()
    private var lagGauges: [Int32: Gauge] = [:]

    /// Records between the committed offset and the log end, per partition.
    func lag(partition: Int32) -> Gauge {
        lock.withLock {
            if let gauge = lagGauges[partition] { return gauge }
            let gauge = Gauge(label: "tally_aggregator_lag_records", dimensions: [("partition", String(partition))])
            lagGauges[partition] = gauge
            return gauge
        }
    }
}
