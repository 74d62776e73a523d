import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyPipeline
import TallyPostgres

struct Webhooks: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage webhook endpoints and see and re-send their deliveries (docs/webhooks.md).",
        discussion: """
            tally-rater delivers every low-balance alert, top-up request and closed invoice to the enabled endpoints \
            subscribed to its type, as signed JSON (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature), \
            retrying with backoff until an attempt is answered with 2xx.
            """,
        subcommands: [Add.self, List.self, Remove.self, Deliveries.self, Resend.self])

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Register an endpoint; prints its id and its signing secret.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The endpoint's URL: https://, or http:// on the loopback interface.") var url: String
        @Option(help: "Message types it receives, comma-separated (\(WebhookEventType.allCases.map(\.rawValue).joined(separator: ", "))). Default: all.")
        var types: String?
        @Option(help: "A note for operators.") var description = ""

        func run() throws {
            if let problem = WebhookURL.problem(url) { throw ValidationError(problem) }
            let chosen = (types ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            for type in chosen where WebhookEventType(rawValue: type) == nil {
                throw ValidationError("--types: \(type) is not a message type (\(WebhookEventType.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            let id = "ep_" + (0..<12).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
            let secret = StandardWebhook.newSecret()
            try connect(database, label: "tally.webhooks").query("""
                INSERT INTO tally.webhook_endpoints (endpoint_id, url, secret, event_types, description) VALUES ($1, $2, $3, $4::text[], $5)
                """, [id, url, secret, PostgresArray(chosen), description])
            print("endpoint \(id)")
            print("secret \(secret)")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List endpoints with their deliveries by state (the secrets are not shown).")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "table, json or csv.") var format = "table"

        func run() throws {
            let rows = try connect(database, label: "tally.webhooks").query("""
                SELECT e.endpoint_id, e.url, array_to_string(e.event_types, ','), CASE WHEN e.disabled THEN 'disabled' ELSE 'enabled' END,
                       e.description, count(d.*) FILTER (WHERE d.delivered_at IS NOT NULL)::text,
                       count(d.*) FILTER (WHERE d.delivered_at IS NULL AND d.failed_at IS NULL)::text,
                       count(d.*) FILTER (WHERE d.failed_at IS NOT NULL)::text
                FROM tally.webhook_endpoints e LEFT JOIN tally.webhook_deliveries d USING (endpoint_id)
                GROUP BY e.endpoint_id ORDER BY e.created_at, e.endpoint_id
                """).rows.map { $0.map { $0 ?? "" } }
            print(TableRenderer.render(header: ["endpoint", "url", "types", "state", "description", "delivered", "pending", "failed"],
                                       rows: rows.map { row in row.enumerated().map { $0.offset == 2 && $0.element.isEmpty ? "all" : $0.element } },
                                       format: format, numericFrom: 5), terminator: "")
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Disable an endpoint: no new attempt goes to it; its pending deliveries are failed (listed, not sent).")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The endpoint's id.") var endpoint: String

        func run() throws {
            let connection = try connect(database, label: "tally.webhooks")
            let failed = try connection.transaction { connection -> Int in
                guard try connection.query("UPDATE tally.webhook_endpoints SET disabled = true WHERE endpoint_id = $1", [endpoint]).affectedRows == 1 else {
                    throw ValidationError("no webhook endpoint \(endpoint)")
                }
                return try connection.query("""
                    UPDATE tally.webhook_deliveries SET failed_at = now(), last_error = 'endpoint disabled'
                    WHERE endpoint_id = $1 AND delivered_at IS NULL AND failed_at IS NULL
                    """, [endpoint]).affectedRows
            }
            print("endpoint \(endpoint) disabled; \(failed) pending deliver\(failed == 1 ? "y" : "ies") failed")
        }
    }

    struct Deliveries: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List deliveries, newest first: their message, state, attempts and the last answer.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "Only this endpoint's.") var endpoint: String?
        @Option(help: "Only this customer's messages.") var customer: String?
        @Option(help: "pending, delivered or failed.") var state: String?
        @Option(help: "At most this many.") var limit = 50
        @Option(help: "table, json or csv.") var format = "table"

        func validate() throws {
            if let state, !["pending", "delivered", "failed"].contains(state) { throw ValidationError("--state: pending, delivered or failed") }
            guard (1...100_000).contains(limit) else { throw ValidationError("--limit must be 1 to 100000") }
        }

        func run() throws {
            let stateColumn = """
                CASE WHEN d.delivered_at IS NOT NULL THEN 'delivered' WHEN d.failed_at IS NOT NULL THEN 'failed' ELSE 'pending' END
                """
            let rows = try connect(database, label: "tally.webhooks").query("""
                SELECT d.message_id, m.event_type, m.customer_id, d.endpoint_id, \(stateColumn), coalesce(left(d.last_error, 120), ''),
                       CASE WHEN d.delivered_at IS NULL AND d.failed_at IS NULL THEN to_char(d.next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') ELSE '' END,
                       d.attempts::text, coalesce(d.last_status::text, '')
                FROM tally.webhook_deliveries d JOIN tally.webhook_messages m USING (message_id)
                WHERE ($1::text IS NULL OR d.endpoint_id = $1) AND ($2::text IS NULL OR m.customer_id = $2) AND ($3::text IS NULL OR \(stateColumn) = $3)
                ORDER BY m.created_at DESC, d.message_id, d.endpoint_id LIMIT $4
                """, [endpoint, customer, state, limit]).rows.map { $0.map { $0 ?? "" } }
            print(TableRenderer.render(header: ["message", "type", "customer", "endpoint", "state", "last_error", "next_attempt", "attempts", "last_status"],
                                       rows: rows, format: format, numericFrom: 7), terminator: "")
        }
    }

    struct Resend: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send a message again: due now, attempts counted anew (delivered, pending or failed alike).",
            discussion: "With --endpoint, to that endpoint (subscribed or not); else to every enabled endpoint subscribed to its type.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The message id (webhook-id), from tally webhooks deliveries.") var message: String
        @Option(help: "Only to this endpoint.") var endpoint: String?

        func run() throws {
            do {
                let count = try WebhookOutbox(connection: try connect(database, label: "tally.webhooks")).resend(message: message, endpoint: endpoint)
                print("\(message): \(count) deliver\(count == 1 ? "y" : "ies") due now")
            } catch let refusal as WebhookRefusal {
                throw ValidationError(refusal.description)
            }
        }
    }
}
