/// A consistent reading of what the rater has charged a customer: the wallet balance and
/// the rater's stored offsets, taken in one statement (the rater commits both in one
/// transaction, so the balance reflects exactly the records before those offsets).
public struct WalletSnapshot: Sendable, Equatable {
    public let balanceNanos: Int64
    /// partition → the rater's next offset.
    public let raterNextOffsets: [Int32: Int64]

    public init(balanceNanos: Int64, raterNextOffsets: [Int32: Int64]) {
        self.balanceNanos = balanceNanos
        self.raterNextOffsets = raterNextOffsets
    }

    /// True when the rater has read past `position`, so the balance already holds its charge.
    public func hasRated(_ position: LogPosition) -> Bool {
        (raterNextOffsets[position.partition] ?? 0) > position.offset
    }
}

/// The gateway's view of credit in flight: estimates reserved by calls still running and
/// charges of finished calls the rater has not debited yet.
///
/// Credit available = balance in the snapshot − everything held here for the customer.
/// A call is admitted while that is above the overage policy's floor and then holds its
/// estimate, so a burst of concurrent calls overshoots by at most one call's estimate
/// (as long as calls use no more than their estimate). Not thread-safe: the owner locks.
public struct CreditReservations: Sendable {
    public struct Hold: Sendable, Equatable {
        public let customerID: String
        public var amountNanos: Int64
        /// Set once the call's usage event is in the log; the hold ends when the rater reads past it.
        public var position: LogPosition?
        /// False while the call runs: `amountNanos` is its estimate.
        public var settled: Bool
    }

    public enum Admission: Sendable, Equatable {
        case admitted(id: Int, availableNanos: Int64)
        case refused(availableNanos: Int64)
    }

    public private(set) var holds: [Int: Hold] = [:]
    private var nextID = 1

    public init() {}

    /// Credit the customer has once everything held for it is taken off the snapshot's balance.
    /// Drops every hold (any customer's) the snapshot's rater offsets show as debited already;
    /// that is safe because snapshots are read one after another, each at least as new as the last.
    public mutating func available(to customerID: String, snapshot: WalletSnapshot) -> Int64 {
        var held: Int64 = 0
        for (id, hold) in holds {
            if let position = hold.position, snapshot.hasRated(position) {
                holds.removeValue(forKey: id)
            } else if hold.customerID == customerID {
                held = Money.saturatingAdd(held, hold.amountNanos)
            }
        }
        // Saturates: holds and balances near the stored limits must refuse calls, not trap.
        // Holds are never negative, so `-held` cannot overflow.
        return Money.saturatingAdd(snapshot.balanceNanos, -held)
    }

    /// Admits a call and reserves its estimate, or refuses it when the policy blocks at the credit left.
    public mutating func admit(_ customerID: String, estimateNanos: Int64, snapshot: WalletSnapshot, policy: OveragePolicy) -> Admission {
        let available = available(to: customerID, snapshot: snapshot)
        if policy.blocks(balanceNanos: available) { return .refused(availableNanos: available) }
        let id = nextID
        nextID += 1
        holds[id] = Hold(customerID: customerID, amountNanos: max(0, estimateNanos), position: nil, settled: false)
        return .admitted(id: id, availableNanos: available)
    }

    /// The call finished: hold its actual charge instead of the estimate. Returns the
    /// overshoot (actual − estimate when positive).
    @discardableResult
    public mutating func settle(_ id: Int, actualNanos: Int64) -> Int64 {
        guard var hold = holds[id] else { return 0 }
        let overshoot = max(0, actualNanos - hold.amountNanos)
        hold.amountNanos = max(0, actualNanos)
        hold.settled = true
        holds[id] = hold
        return overshoot
    }

    /// The call's usage event is at `position`: the hold lasts until the rater has read it.
    public mutating func published(_ id: Int, at position: LogPosition) {
        holds[id]?.position = position
    }

    /// The call used nothing (or its event could not be written): drop the hold.
    public mutating func release(_ id: Int) {
        holds.removeValue(forKey: id)
    }
}
