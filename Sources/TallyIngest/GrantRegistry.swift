import Foundation
import Logging
import TallyCore
import TallyPipeline
import TallyPostgres

/// The grants the rater has credited (`tally.wallet_grants`), asked before a grant is published:
/// a grant id names one grant, so the same id with other terms is refused (409) rather than
/// published and then recorded as a conflict. A grant still on its way to the rater is not seen
/// here; the rater then records the conflict (`tally.event_conflicts`) and credits the first.
///
/// libpq blocks, so look-ups run on a queue of their own, never on the event loop.
final class GrantRegistry: @unchecked Sendable {
    private let queue = DispatchQueue(label: "tally.ingest.grants")
    private let connection: PostgresConnection
    private let logger: Logger

    init(connection: PostgresConnection, logger: Logger) {
        self.connection = connection
        self.logger = logger
    }

    enum Check: Equatable {
        /// Not credited yet, or credited with the same terms (a retry): publish.
        case publish
        /// Credited already with other terms, described.
        case conflicting(String)
        case unavailable
    }

    func check(_ grant: GrantEvent) async -> Check {
        await withCheckedContinuation { continuation in
            queue.async { [self] in
                do {
                    let result = try connection.retrying(timeout: .seconds(2)) { connection in
                        try connection.query("""
                            SELECT currency, amount_nanos, priority, \(microseconds("expires_at")), source
                            FROM tally.wallet_grants WHERE customer_id = $1 AND grant_id = $2
                            """, [grant.subject, grant.id])
                    }
                    guard result.rowCount == 1 else { return continuation.resume(returning: .publish) }
                    let currency = result.string(0, 0) ?? ""
                    let amount = try result.int64(0, 1) ?? 0
                    let priority = try result.int64(0, 2) ?? 0
                    let expiresAt = try result.int64(0, 3)
                    let source = result.string(0, 4) ?? ""
                    let same = currency == grant.currency.code && amount == grant.amountNanos && priority == grant.priority
                        && expiresAt == grant.expiresAt?.microseconds && source == grant.grantSource.rawValue
                    continuation.resume(returning: same ? .publish : .conflicting(
                        "\(Money.format(nanos: amount)) \(currency), priority \(priority), "
                        + "\(expiresAt.map { "expiring \(EventTime.format(microseconds: $0))" } ?? "never expiring"), source \(source)"))
                } catch {
                    logger.error("grant look-up failed: \(error)", metadata: ["customer_id": "\(grant.subject)", "grant_id": "\(grant.id)"])
                    continuation.resume(returning: .unavailable)
                }
            }
        }
    }
}
