import Foundation
import Metrics
import TallyCore

/// A consumer loop's metrics (`tally_aggregator_*` or `tally_rater_*`), created once.
/// Labels are never customer ids.
final class ConsumerMetrics: @unchecked Sendable {
    let prefix: String
    let records: Counter
    let accepted: Counter
    let duplicates: Counter
    let conflicts: Counter
    let grants: Counter
    /// Usage no price book prices: kept in `tally.unpriced_usage`, never billed at zero silently.
    let unpriced: Counter
    /// Records whose rating would leave the stored range: kept in `tally.unrateable_records`.
    let unrateable: Counter
    let fencedBatches: Counter
    let batchRecords: Recorder
    let transactionSeconds: Metrics.Timer
    private let lock = NSLock()
    private var lagGauges: [Int32: Gauge] = [:]
    private var deadLetterCounters: [String: Counter] = [:]

    init(prefix: String) {
        self.prefix = prefix
        records = Counter(label: "\(prefix)_records_total")
        accepted = Counter(label: "\(prefix)_events_accepted_total")
        duplicates = Counter(label: "\(prefix)_duplicates_total")
        conflicts = Counter(label: "\(prefix)_conflicts_total")
        grants = Counter(label: "\(prefix)_grants_total")
        unpriced = Counter(label: "\(prefix)_unpriced_events_total")
        unrateable = Counter(label: "\(prefix)_unrateable_records_total")
        fencedBatches = Counter(label: "\(prefix)_fenced_batches_total")
        batchRecords = Recorder(label: "\(prefix)_batch_records")
        transactionSeconds = Metrics.Timer(label: "\(prefix)_transaction_seconds")
        // Exported at zero from the start: Prometheus's increase() cannot see a series' first sample
        // as an increase, so a counter made at the first dead letter would hide that one.
        for code in PoisonReason.codes { _ = deadLetters(reason: code) }
    }

    /// Records set aside as poison, per reason code (`PoisonReason.code`, e.g. `wrong_partition`).
    func deadLetters(reason: String) -> Counter {
        lock.withLock {
            if let counter = deadLetterCounters[reason] { return counter }
            let counter = Counter(label: "\(prefix)_dead_letters_total", dimensions: [("reason", reason)])
            deadLetterCounters[reason] = counter
            return counter
        }
    }

    /// Records between the committed offset and the log end, per partition.
    func lag(partition: Int32) -> Gauge {
        lock.withLock {
            if let gauge = lagGauges[partition] { return gauge }
            let gauge = Gauge(label: "\(prefix)_lag_records", dimensions: [("partition", String(partition))])
            lagGauges[partition] = gauge
            return gauge
        }
    }
}
