import Foundation
import Logging
import TallyCore
import TallyPostgres

/// Checks `Authorization: Bearer` keys against `tally.api_keys`, with a short cache.
///
/// libpq calls block, so they run on a queue of their own, never on the event loop.
/// A revoked key stops working within `cacheTTL`.
final class Authenticator: @unchecked Sendable {
    private let queue = DispatchQueue(label: "tally.ingest.auth")
    private let store: APIKeyStore
    private let connection: PostgresConnection
    private let logger: Logger
    private let cacheTTL: Duration
    /// Touched on `queue` only.
    private var cache: [String: (record: APIKeyRecord?, until: ContinuousClock.Instant)] = [:]

    init(connection: PostgresConnection, logger: Logger, cacheTTL: Duration = .seconds(10)) {
        self.connection = connection
        self.store = APIKeyStore(connection: connection)
        self.logger = logger
        self.cacheTTL = cacheTTL
    }

    enum Outcome {
        case allowed(APIKeyRecord)
        case denied
        case unavailable
    }

    func check(authorization: String?) async -> Outcome {
        guard let authorization, authorization.lowercased().hasPrefix("bearer ") else { return .denied }
        let key = String(authorization.dropFirst("bearer ".count)).trimmingCharacters(in: .whitespaces)
        // A string no key can be costs no look-up and no memory: the cache holds 63-byte keys only.
        guard APIKeyStore.isWellFormed(key) else { return .denied }
        return await withCheckedContinuation { continuation in
            queue.async { [self] in
                let now = ContinuousClock.now
                if let cached = cache[key], cached.until > now {
                    continuation.resume(returning: Self.outcome(cached.record))
                    return
                }
                do {
                    let record = try connection.retrying(timeout: .seconds(2)) { _ in try store.authenticate(key) }
                    if cache.count > 10_000 { cache.removeAll() }
                    cache[key] = (record, now + cacheTTL)
                    continuation.resume(returning: Self.outcome(record))
                } catch {
                    logger.error("API key check failed: \(error)")
                    continuation.resume(returning: .unavailable)
                }
            }
        }
    }

    /// A key that lapsed while cached is refused at once, not when the cache entry ends.
    private static func outcome(_ record: APIKeyRecord?) -> Outcome {
        guard let record else { return .denied }
        if let text = record.expiresAt, let expiry = EventTime(text), expiry.microseconds <= CreditGuard.nowMicroseconds() { return .denied }
        return .allowed(record)
    }

    /// True when the database answers.
    func databaseReachable() async -> Bool {
        await withCheckedContinuation { continuation in
            queue.async { [self] in
                continuation.resume(returning: (try? connection.retrying(timeout: .seconds(1)) { try $0.query("SELECT 1") }) != nil)
            }
        }
    }
}
