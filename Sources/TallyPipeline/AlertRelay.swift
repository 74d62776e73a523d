import Foundation
import Logging
import TallyCore
import TallyKafka
import TallyPostgres

/// Publishes committed low-balance alerts and top-up requests to the alerts topic (an outbox):
/// rows are written in the rater's batch transaction, published after commit, then marked.
///
/// A crash between publish and mark publishes a row again, with the same id in the event, so
/// readers of the topic deduplicate by id; the tables hold each crossing exactly once.
public final class AlertRelay: @unchecked Sendable {
    private let connection: PostgresConnection
    private let producer: BlockingProducer
    private let topic: String
    private let logger: Logger

    public init(connection: PostgresConnection, producer: BlockingProducer, topic: String, logger: Logger) {
        self.connection = connection
        self.producer = producer
        self.topic = topic
        self.logger = logger
    }

    /// Relays every `interval` until `stop` is set, then makes one last pass so that what the
    /// final batches committed is published before the process exits.
    /// `eachPass` runs after every pass on this thread (the rater closes due invoices there).
    public func run(stop: SharedFlag, interval: Duration = .seconds(1), eachPass: ((PostgresConnection) throws -> Void)? = nil) {
        while true {
            let stopping = stop.isSet
            do {
                while try relayOnce(stop: stop) > 0 {}
                try eachPass?(connection)
            } catch {
                logger.warning("alert relay: \(error); retrying")
            }
            if stopping { return }
            var waited = Duration.zero
            while waited < interval && !stop.isSet {
                Thread.sleep(forTimeInterval: 0.1)
                waited += .milliseconds(100)
            }
        }
    }

    /// Publishes up to 500 unpublished rows of each table; returns how many.
    @discardableResult
    public func relayOnce(stop: SharedFlag) throws -> Int {
        try connection.transaction { connection in
            // SKIP LOCKED: several rater instances relay without publishing the same rows at once.
            let alerts = try connection.query("""
                SELECT alert_id, customer_id, currency, threshold_nanos, balance_nanos,
                       to_char(crossed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                FROM balance_alerts WHERE published_at IS NULL ORDER BY crossed_at, alert_id LIMIT 500 FOR UPDATE SKIP LOCKED
                """)
            let topUps = try connection.query("""
                SELECT request_id, customer_id, currency, below_nanos, amount_nanos, balance_nanos,
                       to_char(requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                FROM topup_requests WHERE published_at IS NULL ORDER BY requested_at, request_id LIMIT 500 FOR UPDATE SKIP LOCKED
                """)
            var records: [ProducerRecord] = []
            for row in 0..<alerts.rowCount {
                records.append(record(type: "tally.wallet.low_balance", id: try alerts.value(row, 0, as: String.self), customer: try alerts.value(row, 1, as: String.self),
                                      time: try alerts.value(row, 5, as: String.self), fields: [
                                          ("currency", try alerts.value(row, 2, as: String.self)),
                                          ("threshold", Money.format(nanos: try alerts.value(row, 3, as: Int64.self))),
                                          ("balance", Money.format(nanos: try alerts.value(row, 4, as: Int64.self))),
                                      ]))
            }
            for row in 0..<topUps.rowCount {
                records.append(record(type: "tally.wallet.topup_requested", id: try topUps.value(row, 0, as: String.self), customer: try topUps.value(row, 1, as: String.self),
                                      time: try topUps.value(row, 6, as: String.self), fields: [
                                          ("currency", try topUps.value(row, 2, as: String.self)),
                                          ("below", Money.format(nanos: try topUps.value(row, 3, as: Int64.self))),
                                          ("amount", Money.format(nanos: try topUps.value(row, 4, as: Int64.self))),
                                          ("balance", Money.format(nanos: try topUps.value(row, 5, as: Int64.self))),
                                      ]))
            }
            guard !records.isEmpty else { return 0 }
            guard producer.sendAll(records, what: "alert publish", shouldStop: { stop.isSet }) else { return 0 }
            try connection.query("UPDATE balance_alerts SET published_at = now() WHERE alert_id = ANY($1::text[])",
                                 [PostgresArray((0..<alerts.rowCount).map { try alerts.value($0, 0, as: String.self) })])
            try connection.query("UPDATE topup_requests SET published_at = now() WHERE request_id = ANY($1::text[])",
                                 [PostgresArray((0..<topUps.rowCount).map { try topUps.value($0, 0, as: String.self) })])
            return records.count
        }
    }

    private func record(type: String, id: String, customer: String, time: String, fields: [(String, String)]) -> ProducerRecord {
        var json = JSONWriter()
        EventEncoder.writeEnvelope(&json, id: id, source: "tally-rater", type: type, subject: customer, time: time)
        json.raw("{")
        for (index, (name, value)) in fields.enumerated() { json.key(name, first: index == 0); json.string(value) }
        json.raw("}}")
        return ProducerRecord(topic: topic, key: Array(customer.utf8), value: json.bytes)
    }
}
