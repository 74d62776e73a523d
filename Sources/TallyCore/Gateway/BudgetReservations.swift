/// What the rater has counted against a customer's budgets, read in one snapshot with the
/// rater's offsets (it commits both in one transaction), so the usage reflects exactly the
/// records before those offsets.
public struct BudgetSnapshot: Sendable {
    /// Each budget with what it counted in the period holding now (a budget per value: at the
    /// value `value`; the key then tells the values apart).
    public let budgets: [(key: BudgetKey, definition: BudgetDefinition, period: BillingPeriod, value: String, used: Int64)]
    /// partition → the rater's next offset.
    public let raterNextOffsets: [Int32: Int64]

    public init(budgets: [(key: BudgetKey, definition: BudgetDefinition, period: BillingPeriod, value: String, used: Int64)],
                raterNextOffsets: [Int32: Int64]) {
        self.budgets = budgets
        self.raterNextOffsets = raterNextOffsets
    }

    public func hasRated(_ position: LogPosition) -> Bool { (raterNextOffsets[position.partition] ?? 0) > position.offset }
}

/// Where one budget stands for an admission: counted, held for calls not counted yet, and left.
public struct BudgetAvailability: Sendable, Equatable {
    public let key: BudgetKey
    public let definition: BudgetDefinition
    public let period: BillingPeriod
    /// The value of the budget's `per` dimension it stands at (`""` for a budget of all usage).
    public let value: String
    public let used: Int64
    public let held: Int64

    /// Limit − used − held; ≤ 0 refuses.
    public var remaining: Int64 {
        // In Int128: `used` may be as low as Int64.min (money budgets count negative deltas), whose negation traps.
        Int64(clamping: Int128(definition.limit) - Int128(used) - Int128(held))
    }
}

/// Holds against enforced budgets: estimates of calls in flight (the gateway's, and those
/// `POST /v1/check` placed) and the usage of finished calls the rater has not counted yet.
///
/// A call is admitted while every enforced budget it falls under has something left once
/// everything held is taken off, and then holds its estimate on each; so a burst of concurrent
/// calls passes a limit by at most one call's estimate (as long as calls use no more than their
/// estimate). The same scheme as credit (`CreditReservations`). Not thread-safe: the owner locks.
public struct BudgetReservations: Sendable {
    public struct Hold: Sendable, Equatable {
        public var amounts: [BudgetKey: Int64]
        /// Set once the call's usage event is in the log; the hold ends when the rater reads past it.
        public var position: LogPosition?
        /// A hold of `/v1/check` not settled by this time (microseconds since the epoch) lapses.
        public var expiresAt: Int64?
        /// Customer and event id of a `/v1/check` hold (see `hold(forEvent:)`).
        var eventKey: String?
    }

    public enum Admission: Sendable, Equatable {
        case admitted(id: Int, budgets: [BudgetAvailability])
        /// The first budget (by name) with nothing left, and where every budget stood.
        case refused(BudgetAvailability, budgets: [BudgetAvailability])
    }

    public private(set) var holds: [Int: Hold] = [:]
    /// Holds placed by `/v1/check` by customer and event id, for the event that settles them.
    private var byEvent: [String: Int] = [:]
    private var nextID = 1

    public init() {}

    /// Where each budget of `snapshot` stands once holds are taken off. Drops every hold (any
    /// customer's) the snapshot shows as counted already, and every lapsed one: snapshots are
    /// read one after another, each at least as new as the last.
    public mutating func availability(_ snapshot: BudgetSnapshot, now: Int64) -> [BudgetAvailability] {
        var held: [BudgetKey: Int64] = [:]
        let wanted = Set(snapshot.budgets.map(\.key))
        for (id, hold) in holds {
            if let position = hold.position, snapshot.hasRated(position) {
                remove(id)
            } else if hold.position == nil, let expiry = hold.expiresAt, expiry <= now {
                remove(id)
            } else {
                for (key, amount) in hold.amounts where wanted.contains(key) { held[key] = Money.saturatingAdd(held[key] ?? 0, amount) }
            }
        }
        return snapshot.budgets.map {
            BudgetAvailability(key: $0.key, definition: $0.definition, period: $0.period, value: $0.value, used: $0.used, held: held[$0.key] ?? 0)
        }
    }

    /// Admits a call whose estimate on each budget it falls under is `estimates` (budgets not
    /// named are not its business), or refuses it naming the budget with nothing left.
    /// - Parameters:
    ///   - eventID: for `/v1/check` holds, the usage event id that will settle the hold (with its customer).
    ///   - expiresAt: when an unsettled `/v1/check` hold lapses.
    public mutating func admit(_ snapshot: BudgetSnapshot, estimates: [BudgetKey: Int64], now: Int64, hold: Bool = true,
                               eventID: (customerID: String, id: String)? = nil, expiresAt: Int64? = nil) -> Admission {
        let standing = availability(snapshot, now: now).filter { estimates[$0.key] != nil }
        if let exhausted = standing.filter({ $0.definition.enforced && $0.remaining <= 0 }).min(by: { $0.key < $1.key }) {
            return .refused(exhausted, budgets: standing)
        }
        guard hold else { return .admitted(id: 0, budgets: standing) }
        let id = nextID
        nextID += 1
        var amounts: [BudgetKey: Int64] = [:]
        // No call holds more than the whole limit: a larger estimate would only shut others out longer.
        for budget in standing where budget.definition.enforced {
            amounts[budget.key] = min(max(0, estimates[budget.key] ?? 0), budget.definition.limit)
        }
        let eventKey = eventID.map(Self.eventKey)
        if let eventKey {
            // A second check for the same event replaces the first hold.
            if let earlier = byEvent[eventKey] { remove(earlier) }
            byEvent[eventKey] = id
        }
        holds[id] = Hold(amounts: amounts, position: nil, expiresAt: expiresAt, eventKey: eventKey)
        return .admitted(id: id, budgets: standing)
    }

    /// Whether any `/v1/check` hold waits for its event.
    public var holdsEvents: Bool { !byEvent.isEmpty }

    /// The hold placed for the event `id` of `customerID` by `/v1/check`, if one is open.
    public func hold(forEvent eventID: (customerID: String, id: String)) -> Int? { byEvent[Self.eventKey(eventID)] }

    /// The call finished: hold what it used (per budget; budgets not named keep their estimate).
    public mutating func settle(_ id: Int, actual: [BudgetKey: Int64]) {
        guard var hold = holds[id] else { return }
        for key in hold.amounts.keys { if let amount = actual[key] { hold.amounts[key] = max(0, amount) } }
        holds[id] = hold
    }

    /// The call's usage event is at `position`: the hold lasts until the rater has read it.
    public mutating func published(_ id: Int, at position: LogPosition) {
        guard holds[id] != nil else { return }
        holds[id]!.position = position
        // Settled: a resent copy of the event finds no hold to settle again.
        if let key = holds[id]!.eventKey, byEvent[key] == id { byEvent.removeValue(forKey: key) }
    }

    /// The call used nothing (or its event could not be written): drop the hold.
    public mutating func release(_ id: Int) { remove(id) }

    private mutating func remove(_ id: Int) {
        if let key = holds.removeValue(forKey: id)?.eventKey, byEvent[key] == id { byEvent.removeValue(forKey: key) }
    }

    private static func eventKey(_ event: (customerID: String, id: String)) -> String { event.customerID + "\u{1}" + event.id }
}
