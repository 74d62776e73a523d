import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Logging
import Metrics
import TallyCore
import TallyPostgres

/// Kinds of webhook messages and what each carries in `data` (docs/webhooks.md).
public enum WebhookEventType: String, CaseIterable, Sendable {
    /// A wallet's balance fell below a low-balance threshold (`tally customers set --low-balance`).
    case lowBalance = "wallet.low_balance"
    /// A wallet fell below its auto top-up threshold: the payment system should grant `amount`.
    case topUpRequested = "wallet.topup_requested"
    /// A billing period was closed into an invoice.
    case invoiceClosed = "invoice.closed"
    /// A budget's usage crossed one of its alert percentages (`alert_at`).
    case budgetThreshold = "budget.threshold"
    /// A budget's usage reached its limit (100 %); an enforced budget now refuses calls.
    case budgetLimitReached = "budget.limit_reached"
    /// One value of a budget per value (a run, a workflow: `per`) reached the limit.
    case usageRunaway = "usage.runaway"
    /// An hour of an anomaly watch reached its factor times the mean of the hours before it.
    case usageAnomaly = "usage.anomaly"
}

/// The webhook outbox: makes a message of every alert, top-up request and closed invoice (once:
/// each source row is stamped, and a message's id derives from its source), and a delivery of it
/// to every enabled endpoint subscribed to its type. Runs in its own transactions, beside the
/// consumers; several instances share the work (`SKIP LOCKED`).
public struct WebhookOutbox {
    public let connection: PostgresConnection

    public init(connection: PostgresConnection) { self.connection = connection }

    /// Makes messages of up to `limit` unstamped rows of each source; returns how many rows.
    @discardableResult
    public func enqueue(limit: Int = 500) throws -> Int {
        try connection.transaction { connection in
            var messages: [(id: String, type: WebhookEventType, customer: String, occurred: String, payload: String)] = []
            /// `data` members are strings; `raw` members are JSON written as they are.
            func add(_ type: WebhookEventType, source: String, customer: String, occurred: String, data: [(String, String)], raw: [(String, String)] = []) {
                var json = JSONWriter(capacity: 256)
                json.raw("{"); json.key("type", first: true); json.string(type.rawValue)
                json.key("timestamp", first: false); json.string(occurred)
                json.key("data", first: false); json.raw("{")
                for (index, (name, value)) in data.enumerated() { json.key(name, first: index == 0); json.string(value) }
                for (name, value) in raw { json.key(name, first: false); json.raw(value) }
                json.raw("}}")
                let payload = String(decoding: json.bytes, as: UTF8.self)
                messages.append((StandardWebhook.messageID(type: type.rawValue, sourceID: source, payload: payload), type, customer, occurred, payload))
            }
            let time = { (column: String) in "to_char(\(column) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')" }
            let alerts = try connection.query("""
                SELECT alert_id, customer_id, currency, threshold_nanos, balance_nanos, \(time("crossed_at"))
                FROM balance_alerts WHERE webhook_at IS NULL ORDER BY crossed_at, alert_id LIMIT $1 FOR UPDATE SKIP LOCKED
                """, [limit])
            for row in 0..<alerts.rowCount {
                let id = try alerts.value(row, 0, as: String.self)
                add(.lowBalance, source: id, customer: try alerts.value(row, 1, as: String.self), occurred: try alerts.value(row, 5, as: String.self), data: [
                    ("alert_id", id), ("customer", try alerts.value(row, 1, as: String.self)), ("currency", try alerts.value(row, 2, as: String.self)),
                    ("threshold", Money.format(nanos: try alerts.value(row, 3, as: Int64.self))),
                    ("balance", Money.format(nanos: try alerts.value(row, 4, as: Int64.self))),
                ])
            }
            let topUps = try connection.query("""
                SELECT request_id, customer_id, currency, below_nanos, amount_nanos, balance_nanos, \(time("requested_at"))
                FROM topup_requests WHERE webhook_at IS NULL ORDER BY requested_at, request_id LIMIT $1 FOR UPDATE SKIP LOCKED
                """, [limit])
            for row in 0..<topUps.rowCount {
                let id = try topUps.value(row, 0, as: String.self)
                add(.topUpRequested, source: id, customer: try topUps.value(row, 1, as: String.self), occurred: try topUps.value(row, 6, as: String.self), data: [
                    ("request_id", id), ("customer", try topUps.value(row, 1, as: String.self)), ("currency", try topUps.value(row, 2, as: String.self)),
                    ("below", Money.format(nanos: try topUps.value(row, 3, as: Int64.self))),
                    ("amount", Money.format(nanos: try topUps.value(row, 4, as: Int64.self))),
                    ("balance", Money.format(nanos: try topUps.value(row, 5, as: Int64.self))),
                ])
            }
            let invoices = try connection.query("""
                SELECT invoice_id, customer_id, currency, total_due_nanos, \(time("closed_at")), \(time("period_start")), \(time("period_end"))
                FROM invoices WHERE webhook_at IS NULL ORDER BY closed_at, invoice_id LIMIT $1 FOR UPDATE SKIP LOCKED
                """, [limit])
            for row in 0..<invoices.rowCount {
                let id = try invoices.value(row, 0, as: String.self)
                add(.invoiceClosed, source: id, customer: try invoices.value(row, 1, as: String.self), occurred: try invoices.value(row, 4, as: String.self), data: [
                    ("invoice_id", id), ("customer", try invoices.value(row, 1, as: String.self)), ("currency", try invoices.value(row, 2, as: String.self)),
                    ("total_due", Money.format(nanos: try invoices.value(row, 3, as: Int64.self))),
                    ("period_start", try invoices.value(row, 5, as: String.self)), ("period_end", try invoices.value(row, 6, as: String.self)),
                ])
            }
            let budgetAlerts = try connection.query("""
                SELECT alert_id, customer_id, budget, kind, percent, measure, unit, used, limit_value, enforced, dimensions::text,
                       \(time("period_start")), \(time("period_end")), \(time("crossed_at")), per, value, baseline, anomaly_factor_percent, baseline_hours
                FROM budget_alerts WHERE webhook_at IS NULL ORDER BY crossed_at, alert_id LIMIT $1 FOR UPDATE SKIP LOCKED
                """, [limit])
            for row in 0..<budgetAlerts.rowCount {
                let id = try budgetAlerts.value(row, 0, as: String.self)
                let measure = try BudgetRow.measure(budgetAlerts, row: row, kind: 5, unit: 6)
                // A budget per value names the value (the run) that reached it.
                var scope = budgetAlerts.string(row, 14).map { [("per", $0), ("value", budgetAlerts.string(row, 15) ?? "")] } ?? []
                // An anomaly names what it compared: the hour with the mean of the hours before, and the factor.
                var compared: [(String, String)] = []
                if let factor = try budgetAlerts.int64(row, 17) {
                    scope.append(("baseline", measure.format(try budgetAlerts.int64(row, 16) ?? 0)))
                    scope.append(("factor", AnomalyRule(factorPercent: Int(factor), baselineHours: 0).factorText))
                    compared.append(("baseline_hours", String(try budgetAlerts.int64(row, 18) ?? 0)))
                }
                let kind = try budgetAlerts.value(row, 3, parsedBy: WebhookEventType.init(rawValue:))
                add(kind, source: id, customer: try budgetAlerts.value(row, 1, as: String.self), occurred: try budgetAlerts.value(row, 13, as: String.self), data: [
                    ("alert_id", id), ("customer", try budgetAlerts.value(row, 1, as: String.self)), ("budget", try budgetAlerts.value(row, 2, as: String.self)),
                    ("measure", measure.kind), ("unit", measure.unit),
                    ("used", measure.format(try budgetAlerts.value(row, 7, as: Int64.self))),
                    ("limit", measure.format(try budgetAlerts.value(row, 8, as: Int64.self))),
                    ("period_start", try budgetAlerts.value(row, 11, as: String.self)), ("period_end", try budgetAlerts.value(row, 12, as: String.self)),
                ] + scope, raw: compared + [("percent", String(try budgetAlerts.value(row, 4, as: Int64.self))),
                         ("enforced", try budgetAlerts.value(row, 9, as: Bool.self) ? "true" : "false"),
                         ("dimensions", try budgetAlerts.value(row, 10, as: String.self))])
            }
            guard !messages.isEmpty else { return 0 }
            try connection.query("""
                INSERT INTO webhook_messages (message_id, event_type, customer_id, occurred_at, payload)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[]) ON CONFLICT DO NOTHING
                """, [PostgresArray(messages.map { $0.id }), PostgresArray(messages.map { $0.type.rawValue }), PostgresArray(messages.map { $0.customer }),
                      PostgresArray(messages.map { $0.occurred }), PostgresArray(messages.map { $0.payload })])
            try connection.query("""
                INSERT INTO webhook_deliveries (message_id, endpoint_id)
                SELECT m.id, e.endpoint_id FROM unnest($1::text[], $2::text[]) AS m(id, type)
                JOIN webhook_endpoints e ON NOT e.disabled AND (e.event_types = '{}' OR m.type = ANY(e.event_types))
                ON CONFLICT DO NOTHING
                """, [PostgresArray(messages.map { $0.id }), PostgresArray(messages.map { $0.type.rawValue })])
            for (table, column, rows) in [("balance_alerts", "alert_id", alerts), ("topup_requests", "request_id", topUps), ("invoices", "invoice_id", invoices),
                                              ("budget_alerts", "alert_id", budgetAlerts)]
            where rows.rowCount > 0 {
                try connection.query("UPDATE \(table) SET webhook_at = now() WHERE \(column) = ANY($1::text[])",
                                     [PostgresArray(try (0..<rows.rowCount).map { try rows.value($0, 0, as: String.self) })])
            }
            return messages.count
        }
    }

    /// Makes `message` due again now for `endpoint` (every enabled endpoint subscribed to its
    /// type when nil), attempts counted anew; returns the deliveries made due.
    public func resend(message: String, endpoint: String?) throws -> Int {
        try connection.transaction { connection in
            guard try connection.query("SELECT 1 FROM webhook_messages WHERE message_id = $1", [message]).rowCount == 1 else {
                throw WebhookRefusal(description: "no webhook message \(message)")
            }
            if let endpoint {
                guard let disabled = try connection.query("SELECT disabled FROM webhook_endpoints WHERE endpoint_id = $1", [endpoint]).scalar else {
                    throw WebhookRefusal(description: "no webhook endpoint \(endpoint)")
                }
                guard disabled == "f" else { throw WebhookRefusal(description: "webhook endpoint \(endpoint) is disabled") }
                try connection.query("INSERT INTO webhook_deliveries (message_id, endpoint_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", [message, endpoint])
            } else {
                try connection.query("""
                    INSERT INTO webhook_deliveries (message_id, endpoint_id)
                    SELECT m.message_id, e.endpoint_id FROM webhook_messages m
                    JOIN webhook_endpoints e ON NOT e.disabled AND (e.event_types = '{}' OR m.event_type = ANY(e.event_types))
                    WHERE m.message_id = $1 ON CONFLICT DO NOTHING
                    """, [message])
            }
            // Attempts start again at 0: an attempt of the earlier claim still under way finds its
            // claim gone and records nothing (`WebhookSender`).
            return try connection.query("""
                UPDATE webhook_deliveries d SET attempts = 0, next_attempt_at = now(), delivered_at = NULL, failed_at = NULL
                FROM webhook_endpoints e
                WHERE d.message_id = $1 AND ($2::text IS NULL OR d.endpoint_id = $2) AND e.endpoint_id = d.endpoint_id AND NOT e.disabled
                """, [message, endpoint]).affectedRows
        }
    }
}

/// A webhook request Tally refuses, with the reason.
public struct WebhookRefusal: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}

/// Delivers due webhook deliveries: each attempt signed anew (Standard Webhooks), any 2xx answer
/// delivers it, anything else (a redirect too, or no answer within `timeout`) makes it due again
/// after the retry policy's delay, and after its last attempt it is failed until re-sent.
///
/// At least once: a delivery is taken with a lease longer than any attempt (the attempts of one
/// claim run side by side, each bounded by `timeout`), so a sender killed during an attempt leaves
/// it due again once the lease has passed, and the receiver deduplicates by `webhook-id`. An
/// outcome is written only while the delivery is still the claim it came from (same attempt
/// number, neither delivered nor failed meanwhile), so a late sender never undoes a newer one.
public final class WebhookSender: @unchecked Sendable {
    private let connection: PostgresConnection
    private let outbox: WebhookOutbox
    private let policy: WebhookRetryPolicy
    private let timeout: Duration
    private let logger: Logger
    private let session: URLSession
    /// Deliveries one claim takes; all are attempted at once.
    private let width: Int
    private let delivered = Counter(label: "tally_webhook_deliveries_total", dimensions: [("outcome", "delivered")])
    private let retried = Counter(label: "tally_webhook_deliveries_total", dimensions: [("outcome", "retry")])
    private let gaveUp = Counter(label: "tally_webhook_deliveries_total", dimensions: [("outcome", "failed")])
    /// Per enabled endpoint, how long its oldest pending delivery's message has waited (0: none).
    private var oldestPending: [String: Gauge] = [:]

    public init(connection: PostgresConnection, policy: WebhookRetryPolicy, timeout: Duration, width: Int = 8, logger: Logger) {
        self.connection = connection
        outbox = WebhookOutbox(connection: connection)
        self.policy = policy
        self.timeout = timeout
        self.width = width
        self.logger = logger
        let configuration = URLSessionConfiguration.ephemeral
        configuration.timeoutIntervalForRequest = timeout.totalSeconds
        configuration.timeoutIntervalForResource = timeout.totalSeconds
        configuration.requestCachePolicy = .reloadIgnoringLocalCacheData
        configuration.httpMaximumConnectionsPerHost = width
        session = URLSession(configuration: configuration, delegate: NoRedirects(), delegateQueue: nil)
    }

    /// Enqueues and delivers every `interval` until `stop` is set; an attempt under way when it
    /// is set finishes (within `timeout`) and is recorded.
    public func run(stop: SharedFlag, interval: Duration = .seconds(1)) {
        while !stop.isSet {
            do {
                while !stop.isSet, try outbox.enqueue() > 0 {}
                while !stop.isSet, try deliverDue() > 0 {}
                try measureBacklog()
            } catch {
                logger.warning("webhooks: \(error); retrying")
            }
            var waited = Duration.zero
            while waited < interval && !stop.isSet {
                Thread.sleep(forTimeInterval: 0.1)
                waited += .milliseconds(100)
            }
        }
    }

    /// Sets `tally_webhook_oldest_pending_seconds{endpoint}`: an endpoint that answers nothing
    /// shows here long before its deliveries fail, whatever the other endpoints do.
    func measureBacklog() throws {
        let rows = try connection.query("""
            SELECT e.endpoint_id, coalesce(extract(epoch FROM now() - min(m.created_at)), 0)::bigint
            FROM webhook_endpoints e
            LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.endpoint_id AND d.delivered_at IS NULL AND d.failed_at IS NULL
            LEFT JOIN webhook_messages m ON m.message_id = d.message_id
            WHERE NOT e.disabled GROUP BY e.endpoint_id
            """)
        var seen = Set<String>()
        for row in 0..<rows.rowCount {
            let endpoint = try rows.value(row, 0, as: String.self)
            seen.insert(endpoint)
            if oldestPending[endpoint] == nil {
                oldestPending[endpoint] = Gauge(label: "tally_webhook_oldest_pending_seconds", dimensions: [("endpoint", endpoint)])
            }
            oldestPending[endpoint]!.record(try rows.value(row, 1, as: Int64.self))
        }
        // Disabled or removed since: nothing waits for them any more.
        for (endpoint, gauge) in oldestPending where !seen.contains(endpoint) { gauge.record(0) }
    }

    /// Attempts up to `width` due deliveries at once; returns how many it attempted.
    @discardableResult
    public func deliverDue() throws -> Int {
        // Every attempt of the claim ends within `timeout` (the wait below gives up then), so
        // twice that and a margin never runs out under a sender that is alive.
        let lease = Int64((timeout * 2).totalSeconds.rounded(.up)) + 5
        let due = try connection.query("""
            UPDATE webhook_deliveries d SET attempts = d.attempts + 1, last_attempt_at = now(),
                next_attempt_at = now() + $1::bigint * interval '1 second'
            FROM (SELECT d2.message_id, d2.endpoint_id FROM webhook_deliveries d2 JOIN webhook_endpoints e2 USING (endpoint_id)
                  WHERE d2.delivered_at IS NULL AND d2.failed_at IS NULL AND d2.next_attempt_at <= now() AND NOT e2.disabled
                  ORDER BY d2.next_attempt_at LIMIT $2 FOR UPDATE OF d2 SKIP LOCKED) due
            WHERE d.message_id = due.message_id AND d.endpoint_id = due.endpoint_id
            RETURNING d.message_id, d.endpoint_id, d.attempts,
                (SELECT payload FROM webhook_messages m WHERE m.message_id = d.message_id),
                (SELECT url FROM webhook_endpoints e WHERE e.endpoint_id = d.endpoint_id),
                (SELECT secret FROM webhook_endpoints e WHERE e.endpoint_id = d.endpoint_id)
            """, [lease, width])
        let attempts = try (0..<due.rowCount).map { row in
            (message: try due.value(row, 0, as: String.self), endpoint: try due.value(row, 1, as: String.self),
             attempt: Int(try due.value(row, 2, as: Int64.self)), payload: try due.value(row, 3, as: String.self),
             url: try due.value(row, 4, as: String.self), secret: try due.value(row, 5, as: String.self))
        }
        guard !attempts.isEmpty else { return 0 }
        // All at once, each on a thread of its own: the slowest bounds the claim, not their sum.
        // `outcomes` is written under `lock` only, and read after `group.wait()`.
        nonisolated(unsafe) var outcomes = [(status: Int?, error: String?)](repeating: (nil, nil), count: attempts.count)
        let lock = NSLock()
        let group = DispatchGroup()
        for (index, attempt) in attempts.enumerated() {
            DispatchQueue.global().async(group: group) {
                let outcome = self.send(attempt.payload, id: attempt.message, url: attempt.url, secret: attempt.secret)
                lock.withLock { outcomes[index] = outcome }
            }
        }
        group.wait()
        for (attempt, outcome) in zip(attempts, outcomes) {
            // Still the claim this attempt came from: a resend or a sender after the lease did not take it since.
            let current = "message_id = $1 AND endpoint_id = $2 AND attempts = $3 AND delivered_at IS NULL AND failed_at IS NULL"
            if let status = outcome.status, (200..<300).contains(status) {
                delivered.increment()
                try connection.query("UPDATE webhook_deliveries SET delivered_at = now(), last_status = $4, last_error = NULL WHERE \(current)",
                                     [attempt.message, attempt.endpoint, attempt.attempt, status])
                continue
            }
            let error = outcome.error ?? "answered \(outcome.status.map { String($0) } ?? "nothing")"
            if let delay = policy.delay(after: attempt.attempt) {
                retried.increment()
                try connection.query("""
                    UPDATE webhook_deliveries SET next_attempt_at = now() + $4::bigint * interval '1 millisecond', last_status = $5, last_error = $6
                    WHERE \(current)
                    """, [attempt.message, attempt.endpoint, attempt.attempt, Int64(delay.totalSeconds * 1000), outcome.status, error])
            } else {
                gaveUp.increment()
                logger.warning("webhook \(attempt.message) to \(attempt.endpoint) failed after \(attempt.attempt) attempts: \(error)")
                try connection.query("UPDATE webhook_deliveries SET failed_at = now(), last_status = $4, last_error = $5 WHERE \(current)",
                                     [attempt.message, attempt.endpoint, attempt.attempt, outcome.status, error])
            }
        }
        return attempts.count
    }

    /// One signed POST; its status, or why there is none.
    private func send(_ payload: String, id: String, url: String, secret: String) -> (status: Int?, error: String?) {
        guard let endpoint = URL(string: url), let key = StandardWebhook.key(of: secret) else { return (nil, "endpoint URL or secret unusable") }
        let body = Array(payload.utf8)
        let timestamp = Int64(Date().timeIntervalSince1970)
        var request = URLRequest(url: endpoint)
        request.httpMethod = "POST"
        request.httpBody = Data(body)
        request.timeoutInterval = timeout.totalSeconds
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        request.setValue("tally-webhooks", forHTTPHeaderField: "User-Agent")
        request.setValue(id, forHTTPHeaderField: "webhook-id")
        request.setValue(String(timestamp), forHTTPHeaderField: "webhook-timestamp")
        request.setValue(StandardWebhook.signature(key: key, messageID: id, timestamp: timestamp, body: body), forHTTPHeaderField: "webhook-signature")
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var result: (status: Int?, error: String?) = (nil, "no answer")
        let task = session.dataTask(with: request) { _, response, error in
            if let response = response as? HTTPURLResponse {
                result = (response.statusCode, nil)
            } else {
                result = (nil, error.map { $0.localizedDescription } ?? "no answer")
            }
            done.signal()
        }
        task.resume()
        // The session's own timeout should end it first; this bounds the attempt whatever happens.
        if done.wait(timeout: .now() + timeout.totalSeconds + 1) == .timedOut {
            task.cancel()
            return (nil, "no answer in \(Int(timeout.totalSeconds)) s")
        }
        return result
    }
}

/// Refuses redirects: a webhook is delivered to the URL registered or not at all (a redirect
/// would turn the POST into a GET, or lead off the https:// rule); the 3xx counts as a failure.
private final class NoRedirects: NSObject, URLSessionTaskDelegate, @unchecked Sendable {
    func urlSession(_ session: URLSession, task: URLSessionTask, willPerformHTTPRedirection response: HTTPURLResponse,
                    newRequest request: URLRequest, completionHandler: @escaping (URLRequest?) -> Void) {
        completionHandler(nil)
    }
}
