import Foundation
import Logging
import TallyCore
import TallyPipeline
import TallyPostgres

/// Decides whether a gateway call may go upstream, from the rater's wallet balance and the
/// credit the gateway holds for calls in flight or not yet rated.
///
/// Every decision reads a fresh balance snapshot and decides on one serial queue, so the
/// snapshots are read in order (`CreditReservations` relies on that). libpq blocks, so the
/// queue is never the event loop.
final class CreditGuard: @unchecked Sendable {
    enum Decision {
        /// `hold` is nil for customers whose policy never refuses (nothing to reserve).
        case admitted(hold: Int?, estimateNanos: Int64, profile: BillingProfile)
        case refused(availableNanos: Int64, profile: BillingProfile)
        /// No price book prices the model and the policy refuses such calls (`UnpricedModelPolicy.refuse`).
        case unpricedRefused(model: String)
        case unavailable(String)
    }

    private let queue = DispatchQueue(label: "tally.gateway.credit")
    private let connection: PostgresConnection
    private let catalogStore: BillingCatalogStore
    private let topic: String
    private let raterGroup: String
    private let unpricedPolicy: UnpricedModelPolicy
    private let logger: Logger
    /// Touched under `lock`: settle/publish/release come from request tasks.
    private let lock = NSLock()
    private var reservations = CreditReservations()
    private var catalog = PriceCatalog(books: [])
    // Touched on `queue` only.
    private var catalogStamp = ""
    private var catalogCheckedAt: ContinuousClock.Instant?
    private var profiles: [String: (profile: BillingProfile, until: ContinuousClock.Instant)] = [:]
    private let cacheTTL = Duration.seconds(5)

    init(connection: PostgresConnection, topic: String, raterGroup: String, unpricedPolicy: UnpricedModelPolicy, logger: Logger) {
        self.connection = connection
        self.unpricedPolicy = unpricedPolicy
        self.catalogStore = BillingCatalogStore(connection: connection)
        self.topic = topic
        self.raterGroup = raterGroup
        self.logger = logger
    }

    /// Admits a call of `model` expected to use `expected` tokens, reserving their estimated charge.
    func admit(customerID: String, model: String, expected: TokenCounts) async -> Decision {
        await withCheckedContinuation { continuation in
            queue.async { [self] in
                do {
                    let profile = try profile(customerID)
                    let priced = CallChargeEstimate.nanos(expected, model: model, customer: profile, catalog: try currentCatalog(),
                                                          at: EventTime(microseconds: Self.nowMicroseconds()))
                    if profile.overage == .allow(limitNanos: nil) {
                        continuation.resume(returning: .admitted(hold: nil, estimateNanos: priced ?? 0, profile: profile))
                        return
                    }
                    // An unpriced model is never free under a policy that can refuse: held at the
                    // default price, or refused.
                    guard let estimate = priced ?? unpricedPolicy.holdNanos(expected) else {
                        continuation.resume(returning: .unpricedRefused(model: model))
                        return
                    }
                    let snapshot = try snapshot(customerID, profile: profile)
                    let admission = lock.withLock {
                        reservations.admit(customerID, estimateNanos: estimate, snapshot: snapshot, policy: profile.overage)
                    }
                    switch admission {
                    case .admitted(let id, _): continuation.resume(returning: .admitted(hold: id, estimateNanos: estimate, profile: profile))
                    case .refused(let available): continuation.resume(returning: .refused(availableNanos: available, profile: profile))
                    }
                } catch {
                    logger.error("credit check failed: \(error)", metadata: ["customer_id": "\(customerID)"])
                    continuation.resume(returning: .unavailable("\(error)"))
                }
            }
        }
    }

    /// The call finished having used `counts`: hold their charge until the rater debits it, at
    /// the price rule `call`'s labels and properties (its service tier, its status) pick.
    /// Returns how far the charge went past the estimate (0 when it did not).
    func settle(_ hold: Int?, counts: TokenCounts, call: UsageEvent, profile: BillingProfile) -> Int64 {
        guard let hold else { return 0 }
        return lock.withLock {
            let actual = CallChargeEstimate.nanos(counts, model: call.model, customer: profile, catalog: catalog,
                                                  at: EventTime(microseconds: Self.nowMicroseconds()), call: call)
                ?? unpricedPolicy.holdNanos(counts) ?? 0
            return reservations.settle(hold, actualNanos: actual)
        }
    }

    /// What `counts` of `call` cost at the prices in force (nil for an unpriced model): the
    /// amount money budgets hold for an answered call until the rater has counted it.
    func charge(_ counts: TokenCounts, call: UsageEvent, profile: BillingProfile) -> Int64? {
        lock.withLock {
            CallChargeEstimate.nanos(counts, model: call.model, customer: profile, catalog: catalog, at: EventTime(microseconds: Self.nowMicroseconds()), call: call)
        }
    }

    func published(_ hold: Int?, at position: LogPosition) {
        guard let hold else { return }
        lock.withLock { reservations.published(hold, at: position) }
    }

    func release(_ hold: Int?) {
        guard let hold else { return }
        lock.withLock { reservations.release(hold) }
    }

    // MARK: On `queue`

    private func profile(_ customerID: String) throws -> BillingProfile {
        let now = ContinuousClock.now
        if let cached = profiles[customerID], cached.until > now { return cached.profile }
        let profile = try connection.retrying(timeout: .seconds(2)) { _ in
            try catalogStore.profiles([customerID])[customerID] ?? BillingProfile(customerID: customerID)
        }
        if profiles.count > 100_000 { profiles.removeAll() }
        profiles[customerID] = (profile, now + cacheTTL)
        return profile
    }

    /// The price catalog, reloaded when a book was applied (checked every few seconds).
    private func currentCatalog() throws -> PriceCatalog {
        let now = ContinuousClock.now
        if let checked = catalogCheckedAt, now - checked < cacheTTL { return lock.withLock { catalog } }
        let stamp = try connection.retrying(timeout: .seconds(2)) { _ in try catalogStore.catalogStamp() }
        if stamp != catalogStamp {
            let loaded = try connection.retrying(timeout: .seconds(2)) { _ in try catalogStore.loadCatalog() }
            lock.withLock { catalog = loaded }
            catalogStamp = stamp
        }
        catalogCheckedAt = now
        return lock.withLock { catalog }
    }

    /// The wallet balance and the rater's offsets in one statement: one snapshot of one commit.
    ///
    /// Usage the rater keeps unpriced (`tally.unpriced_usage`) is not in the balance; under the
    /// hold policy it counts against it here, at the default price, until a price exists and the
    /// usage is rated (`tally pricing rate-unpriced`): calls to an unpriced model are never free.
    private func snapshot(_ customerID: String, profile: BillingProfile) throws -> WalletSnapshot {
        let currency = profile.currency
        let result = try connection.retrying(timeout: .seconds(2)) { connection in
            try connection.query("""
                SELECT coalesce((SELECT balance_nanos FROM wallets WHERE customer_id = $1 AND currency = $2), 0),
                       coalesce((SELECT string_agg(partition || ':' || next_offset, ',') FROM consumer_offsets
                                 WHERE consumer_group = $3 AND topic = $4), ''),
                       (SELECT string_agg(model || chr(1) || i || chr(1) || o, chr(2)) FROM
                            (SELECT model, sum(input_tokens)::text AS i, sum(output_tokens)::text AS o
                             FROM unpriced_usage WHERE customer_id = $1 GROUP BY model) AS m)
                """, [customerID, currency.code, raterGroup, topic])
        }
        var offsets: [Int32: Int64] = [:]
        for pair in (result.string(0, 1) ?? "").split(separator: ",") {
            let parts = pair.split(separator: ":")
            if parts.count == 2, let partition = Int32(parts[0]), let next = Int64(parts[1]) { offsets[partition] = next }
        }
        var balance = try result.int64(0, 0) ?? 0
        // Only models still unpriced: once priced, the usage is rated by `tally pricing rate-unpriced`.
        let now = EventTime(microseconds: Self.nowMicroseconds())
        for entry in (result.string(0, 2) ?? "").split(separator: "\u{2}") {
            let fields = entry.split(separator: "\u{1}", omittingEmptySubsequences: false).map(String.init)
            guard fields.count == 3, lock.withLock({ catalog.match(customerID: profile.customerID, plan: profile.plan, model: fields[0], at: now) }) == nil,
                  let held = unpricedPolicy.holdNanos(TokenCounts(input: Int64(fields[1]) ?? Int64.max, output: Int64(fields[2]) ?? Int64.max))
            else { continue }
            balance = Money.saturatingAdd(balance, -held)
        }
        return WalletSnapshot(balanceNanos: balance, raterNextOffsets: offsets)
    }

    static func nowMicroseconds() -> Int64 { Int64(Date().timeIntervalSince1970 * 1_000_000) }
}
