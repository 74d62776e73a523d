import Foundation
import TallyCore

/// Requests per second per API key (a token bucket holding up to two seconds' worth): a key past
/// it is answered `429` with `Retry-After`, so one client cannot take the ingest API from others.
/// Keyed by key id, so only real keys have buckets.
final class KeyRateLimiter: @unchecked Sendable {
    private let lock = NSLock()
    private let perSecond: Double
    private let burst: Double
    private var buckets: [String: (tokens: Double, at: ContinuousClock.Instant)] = [:]

    /// Nil for 0: no limit.
    init?(perSecond: Int) {
        guard perSecond > 0 else { return nil }
        self.perSecond = Double(perSecond)
        burst = 2 * Double(perSecond)
    }

    /// Nil when the request may go; otherwise how long until it could.
    func wait(for keyID: String) -> Duration? {
        let now = ContinuousClock.now
        return lock.withLock {
            var bucket = buckets[keyID] ?? (burst, now)
            let elapsed = now - bucket.at
            bucket.tokens = min(burst, bucket.tokens + perSecond * elapsed.totalSeconds)
            bucket.at = now
            defer { buckets[keyID] = bucket }
            guard bucket.tokens >= 1 else { return .milliseconds(Int(((1 - bucket.tokens) / perSecond * 1000).rounded(.up))) }
            bucket.tokens -= 1
            return nil
        }
    }
}
