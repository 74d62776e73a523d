import Foundation
import Logging
import Metrics
import TallyCore
import TallyPipeline
import TallyPostgres

/// Enforces budgets for the gateway and `POST /v1/check`: reads what the rater counted (with
/// its offsets, in one snapshot) and holds what calls in flight and calls not yet counted use
/// (`BudgetReservations`).
///
/// Decisions read their snapshots one after another on one serial queue, so each is at least as
/// new as the last (the reservations rely on that); libpq blocks, so the queue is never the
/// event loop. Customers without an enforced budget cost one set lookup (the set is read again
/// every few seconds, so a new budget is enforced within `cacheTTL`). Holds live in this
/// process: behind several tally-ingest replicas, send a customer's calls to one of them.
final class BudgetGuard: @unchecked Sendable {
    enum Decision {
        /// No enforced budget of the customer applies.
        case unbudgeted
        /// `hold` is 0 when none was asked for.
        case admitted(hold: Int, budgets: [BudgetAvailability])
        case refused(BudgetAvailability, budgets: [BudgetAvailability])
        case unavailable(String)
    }

    private let queue = DispatchQueue(label: "tally.ingest.budgets")
    private let connection: PostgresConnection
    private let topic: String
    private let raterGroup: String
    private let logger: Logger
    private let cacheTTL: Duration
    /// Touched under `lock`: settle/publish/release come from request tasks.
    private let lock = NSLock()
    private var reservations = BudgetReservations()
    // Touched on `queue` only.
    private var enforcedCustomers: Set<String> = []
    private var customersReadAt: ContinuousClock.Instant?
    /// Refusals by route: gateway calls answered 429, `/v1/check` answers "not allowed".
    enum Route: String, CaseIterable { case gateway, check }
    private let refusals = Dictionary(uniqueKeysWithValues: Route.allCases.map {
        ($0, Counter(label: "tally_budget_refusals_total", dimensions: [("route", $0.rawValue)]))
    })

    init(connection: PostgresConnection, topic: String, raterGroup: String, logger: Logger, cacheTTL: Duration = .seconds(2)) {
        self.connection = connection
        self.topic = topic
        self.raterGroup = raterGroup
        self.logger = logger
        self.cacheTTL = cacheTTL
    }

    /// Decides whether usage like `call` (its labels and properties: the dimensions budgets
    /// pick usage by) may go ahead, holding `estimate(definition)` on each enforced budget it
    /// falls under when `hold` is set.
    /// - Parameters:
    ///   - includeSoft: also report soft budgets (they never refuse).
    ///   - eventID/expiresAt: a `/v1/check` hold that the usage event with that id settles, or lapses then.
    func admit(_ call: UsageEvent, route: Route, hold: Bool, includeSoft: Bool = false, eventID: String? = nil, expiresAt: Int64? = nil,
               estimate: @escaping @Sendable (BudgetDefinition) -> Int64) async -> Decision {
        await withCheckedContinuation { continuation in
            queue.async { [self] in
                do {
                    let now = CreditGuard.nowMicroseconds()
                    guard try includeSoft || hasEnforcedBudgets(call.subject) else { return continuation.resume(returning: .unbudgeted) }
                    let snapshot = try snapshot(call.subject, at: now, call: call)
                    var estimates: [BudgetKey: Int64] = [:]
                    for budget in snapshot.budgets where budget.definition.counter(of: call) != nil && (includeSoft || budget.definition.enforced) {
                        estimates[budget.key] = estimate(budget.definition)
                    }
                    guard !estimates.isEmpty else { return continuation.resume(returning: .unbudgeted) }
                    let admission = lock.withLock {
                        reservations.admit(snapshot, estimates: estimates, now: now, hold: hold && estimates.keys.contains { key in
                            snapshot.budgets.contains { $0.key == key && $0.definition.enforced }
                        }, eventID: eventID.map { (call.subject, $0) }, expiresAt: expiresAt)
                    }
                    switch admission {
                    case .admitted(let id, let budgets): continuation.resume(returning: .admitted(hold: id, budgets: budgets))
                    case .refused(let budget, let budgets):
                        refusals[route]!.increment()
                        continuation.resume(returning: .refused(budget, budgets: budgets))
                    }
                } catch {
                    logger.error("budget check failed: \(error)", metadata: ["customer_id": "\(call.subject)"])
                    continuation.resume(returning: .unavailable("\(error)"))
                }
            }
        }
    }

    /// Every budget of `call`'s customer with what it counted this period and what is held here.
    func standing(of call: UsageEvent) async -> Result<[BudgetAvailability], Error> {
        await withCheckedContinuation { continuation in
            queue.async { [self] in
                do {
                    let now = CreditGuard.nowMicroseconds()
                    let snapshot = try snapshot(call.subject, at: now, call: nil)
                    continuation.resume(returning: .success(lock.withLock { reservations.availability(snapshot, now: now) }))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
    }

    /// The call finished: hold what it used on each budget instead of its estimate.
    func settle(_ hold: Int, used: (BudgetDefinition) -> Int64?) {
        guard hold != 0 else { return }
        lock.withLock {
            guard let amounts = reservations.holds[hold]?.amounts else { return }
            // Budgets are named by key in the hold; their definitions are what `used` needs.
            var actual: [BudgetKey: Int64] = [:]
            for key in amounts.keys {
                if let definition = definitions[key], let amount = used(definition) { actual[key] = amount }
            }
            reservations.settle(hold, actual: actual)
        }
    }

    func published(_ hold: Int, at position: LogPosition) {
        guard hold != 0 else { return }
        lock.withLock { reservations.published(hold, at: position) }
    }

    func release(_ hold: Int) {
        guard hold != 0 else { return }
        lock.withLock { reservations.release(hold) }
    }

    /// A usage event accepted by `/v1/events` at `position`: a `/v1/check` hold placed for its id
    /// now holds what the event used (money budgets keep the estimate: the charge is the rater's
    /// to work out) until the rater has counted it.
    func accepted(_ event: UsageEvent, at position: LogPosition) {
        lock.withLock {
            guard let hold = reservations.hold(forEvent: (event.subject, event.id)), let amounts = reservations.holds[hold]?.amounts else { return }
            var actual: [BudgetKey: Int64] = [:]
            for key in amounts.keys {
                guard let definition = definitions[key] else { continue }
                // Usage outside the budget (or another run's) holds nothing on it.
                guard let counter = definition.counter(of: event), Self.key(customerID: event.subject, definition, value: counter) == key else {
                    actual[key] = 0
                    continue
                }
                switch definition.measure {
                case .tokens, .meter, .calls: actual[key] = definition.amount(of: event, charge: nil)
                case .money: break
                }
            }
            reservations.settle(hold, actual: actual)
            reservations.published(hold, at: position)
        }
    }

    /// Whether any open `/v1/check` hold waits for an event (so `/v1/events` can skip the lookup).
    var holdsEvents: Bool { lock.withLock { reservations.holdsEvents } }

    // MARK: On `queue`

    /// Definitions of budgets with holds, as last read (for settling by measure). Under `lock`.
    private var definitions: [BudgetKey: BudgetDefinition] = [:]

    private func hasEnforcedBudgets(_ customerID: String) throws -> Bool {
        let now = ContinuousClock.now
        if customersReadAt.map({ now - $0 >= cacheTTL }) ?? true {
            let rows = try connection.retrying(timeout: .seconds(2)) { connection in
                try connection.query("SELECT DISTINCT customer_id FROM budgets WHERE enforced")
            }
            enforcedCustomers = Set(rows.rows.compactMap { $0[0] })
            customersReadAt = now
        }
        return enforcedCustomers.contains(customerID)
    }

    /// The customer's budgets with their usage this period and the rater's offsets, in one
    /// REPEATABLE READ snapshot (the rater commits both in one transaction).
    private func snapshot(_ customerID: String, at now: Int64, call: UsageEvent?) throws -> BudgetSnapshot {
        let (standings, offsets) = try connection.retrying(timeout: .seconds(2)) { connection in
            try connection.transaction { connection in
                try connection.query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                let standings = try BudgetStore(connection: connection).standings(customerID: customerID, at: now, call: call)
                let offsets = try connection.query("SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2",
                                                   [raterGroup, topic])
                var next: [Int32: Int64] = [:]
                for row in 0..<offsets.rowCount { next[Int32(try offsets.value(row, 0, as: Int64.self))] = try offsets.value(row, 1, as: Int64.self) }
                return (standings, next)
            }
        }
        lock.withLock {
            if definitions.count > 100_000 { definitions.removeAll() }
            for standing in standings { definitions[Self.key(standing)] = standing.definition }
        }
        // Anomaly watches alert; they are no limit to check or hold against.
        return BudgetSnapshot(budgets: standings.filter { $0.definition.anomaly == nil }.map { (Self.key($0), $0.definition, $0.period, $0.value, $0.used) },
                              raterNextOffsets: offsets)
    }

    /// What holds are kept under: the budget, and for a budget per value the value (each run holds apart).
    static func key(_ standing: BudgetStanding) -> BudgetKey { key(customerID: standing.customerID, standing.definition, value: standing.value) }

    static func key(customerID: String, _ definition: BudgetDefinition, value: String) -> BudgetKey {
        BudgetKey(customerID: customerID, name: definition.per == nil ? definition.name : definition.name + "\u{0}" + value)
    }
}
