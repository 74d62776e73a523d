/// A budget in force: its definition and the declaration that set its limit.
public struct DeclaredBudget: Hashable, Sendable {
    public var definition: BudgetDefinition
    public var eventID: String
    /// The declaration that set the current limit and alert percentages: alerts of that limit
    /// carry it in their ids, so a raised limit can be crossed (and alerted) again.
    public var declaredAt: LogPosition
    public var declaredTime: EventTime

    public init(definition: BudgetDefinition, eventID: String, declaredAt: LogPosition, declaredTime: EventTime) {
        self.definition = definition
        self.eventID = eventID
        self.declaredAt = declaredAt
        self.declaredTime = declaredTime
    }
}

public struct BudgetKey: Hashable, Sendable, Comparable {
    public let customerID: String
    public let name: String

    public init(customerID: String, name: String) {
        self.customerID = customerID
        self.name = name
    }

    public static func < (a: BudgetKey, b: BudgetKey) -> Bool { (a.customerID, a.name) < (b.customerID, b.name) }
}

/// Where a budget's usage of one period (and, for a budget per value, one value) lives.
public struct BudgetUsageKey: Hashable, Sendable, Comparable {
    public let budget: BudgetKey
    public let period: BillingPeriod
    /// The value of the budget's `per` dimension; `""` for a budget of all its usage.
    public let value: String

    public init(budget: BudgetKey, period: BillingPeriod, value: String = "") {
        self.budget = budget
        self.period = period
        self.value = value
    }

    public static func < (a: BudgetUsageKey, b: BudgetUsageKey) -> Bool {
        (a.budget, a.period.start, a.value) < (b.budget, b.period.start, b.value)
    }
}

/// An alert percentage of a budget crossed upwards (once per period and limit: its id says which).
public struct BudgetAlert: Hashable, Sendable {
    public enum Kind: String, Sendable, CaseIterable {
        case threshold = "budget.threshold"
        case limitReached = "budget.limit_reached"
        /// The limit of a budget per value (`per`, such as a run) reached by one value: a run or
        /// workflow that ran away.
        case runaway = "usage.runaway"
        /// An hour of an anomaly watch reached its factor times the hours before it.
        case anomaly = "usage.anomaly"
    }

    public let budget: BudgetKey
    public let definition: BudgetDefinition
    public let percent: Int
    public let used: Int64
    public let period: BillingPeriod
    /// Event time of the usage that crossed it.
    public let crossedAt: Int64
    public let position: LogPosition
    public let declaredAt: LogPosition
    /// The value of the budget's `per` dimension that crossed it (`""` for a budget of all usage).
    public let value: String
    /// An anomaly watch's baseline: the mean usage of the hours before (rounded half up).
    public let baseline: Int64?

    public var kind: Kind {
        if definition.anomaly != nil { return .anomaly }
        return percent != 100 ? .threshold : definition.per == nil ? .limitReached : .runaway
    }

    /// Deterministic: a re-applied batch or a replay cannot raise it twice.
    public var alertID: String {
        // A value may be long (a property value, up to 1,024 characters): its fingerprint keeps the id short.
        var hash = ContentHash.FNV()
        hash.add(value)
        let scope = definition.per == nil ? "" : "/v\(String(hash.value, radix: 16))"
        // An anomaly alerts once per hour (and value), whatever its ratio.
        let crossing = definition.anomaly == nil ? "\(percent)%" : "anomaly"
        return "\(budget.customerID)/budget/\(budget.name)/\(EventTime.format(microseconds: period.start))/\(crossing)\(scope)/\(declaredAt.partition)-\(declaredAt.offset)"
    }
}

/// Budgets and their usage as a batch reads them (loaded from PostgreSQL for its customers).
public struct BudgetState: Sendable {
    /// Customer → budget name → budget; a customer loaded without budgets maps to an empty dictionary.
    public var budgets: [String: [String: DeclaredBudget]] = [:]
    /// Usage per budget and period; a key loaded and absent is 0.
    public var usage: [BudgetUsageKey: Int64] = [:]

    public init() {}
}

/// What a batch changed: budgets declared or removed, usage moved, usage to clear, alerts.
public struct BudgetResult: Sendable {
    /// Budgets whose row changes (declared, changed or removed: absent from the state).
    public var touchedBudgets = Set<BudgetKey>()
    /// Budgets whose earlier usage no longer counts (removed, or now counting other usage):
    /// their stored usage rows go before the batch's usage is written.
    public var clearedUsage = Set<BudgetKey>()
    public var touchedUsage = Set<BudgetUsageKey>()
    public var alerts: [BudgetAlert] = []
    /// Declarations that changed nothing, with why (kept in `tally.unrateable_records`).
    public var refused: [UnrateableRecord] = []
}

/// Counts usage against budgets, in log order: pure, deterministic, no I/O.
///
/// A budget counts the usage of its customer that follows its declaration in the log, each
/// event in the period of its event time. A declaration that changes only the limit, the alert
/// percentages or enforcement keeps what was counted; one that changes what is counted (period,
/// measure, dimensions) starts over, as does removing and declaring again.
public enum BudgetEngine {
    /// Budgets (and anomaly watches) one customer may have: each is looked at for every usage
    /// event of the customer, by the rater and by the gateway.
    public static let maxBudgetsPerCustomer = 100

    /// What `apply` reads, to load first (more than needed is harmless): the usage keys `records`
    /// may touch (absent ones are 0), and the hours of anomaly watches whose baselines it
    /// compares with (every stored hour of the `baselineHours` before each must be loaded).
    public static func keysToLoad(_ records: [RaterRecord], state: BudgetState, profiles: [String: BillingProfile])
        -> (usage: Set<BudgetUsageKey>, baselines: Set<BudgetUsageKey>) {
        var declared: [String: [BudgetDefinition]] = [:]
        for record in records {
            if case .budget(let positioned) = record, let definition = positioned.budget.definition {
                declared[positioned.budget.subject, default: []].append(definition)
            }
        }
        var keys = Set<BudgetUsageKey>()
        var baselines = Set<BudgetUsageKey>()
        for record in records {
            guard case .usage(let positioned) = record else { continue }
            let customer = positioned.event.subject
            let definitions = (state.budgets[customer].map { $0.values.map(\.definition) } ?? []) + (declared[customer] ?? [])
            guard !definitions.isEmpty else { continue }
            let profile = profiles[customer] ?? BillingProfile(customerID: customer)
            for definition in definitions {
                guard let value = definition.counter(of: positioned.event) else { continue }
                let key = BudgetUsageKey(budget: BudgetKey(customerID: customer, name: definition.name),
                                         period: definition.period.containing(positioned.event.time.microseconds, profile: profile), value: value)
                keys.insert(key)
                if definition.anomaly != nil { baselines.insert(key) }
            }
        }
        return (keys, baselines)
    }

    /// Applies accepted records in log order.
    /// - Parameters:
    ///   - charges: what the rater charged each usage event (`RatingResult.charged`), for money budgets.
    ///   - skipped: usage the rater kept aside as unrateable: it counts against no budget either.
    public static func apply(_ records: [RaterRecord], charges: [LogPosition: (currency: Currency, nanos: Int64)], skipped: Set<LogPosition>,
                             profiles: [String: BillingProfile], to state: inout BudgetState) -> BudgetResult {
        var result = BudgetResult()
        for record in records {
            switch record {
            case .budget(let positioned): declare(positioned, state: &state, result: &result)
            case .usage(let positioned):
                guard let budgets = state.budgets[positioned.event.subject], !budgets.isEmpty, !skipped.contains(positioned.position) else { continue }
                count(positioned, budgets: budgets, charge: charges[positioned.position], profiles: profiles, state: &state, result: &result)
            case .grant, .grantVoid: continue
            }
        }
        return result
    }

    private static func declare(_ positioned: PositionedBudget, state: inout BudgetState, result: inout BudgetResult) {
        let event = positioned.budget
        let key = BudgetKey(customerID: event.subject, name: event.name)
        let existing = state.budgets[key.customerID]?[key.name]
        guard let definition = event.definition else {
            guard existing != nil else { return }
            state.budgets[key.customerID]?[key.name] = nil
            clearUsage(of: key, state: &state, result: &result)
            result.touchedBudgets.insert(key)
            return
        }
        if let existing, existing.definition == definition { return }
        if existing == nil, (state.budgets[key.customerID]?.count ?? 0) >= maxBudgetsPerCustomer {
            result.refused.append(UnrateableRecord(record: .budget(positioned), reason: "customer \(key.customerID) has \(maxBudgetsPerCustomer) budgets "
                + "already, the most one may have: budget \(key.name) was not declared (remove one first)"))
            return
        }
        if let existing, existing.definition.countsLike(definition) {
            // Same usage counted: what was counted stays; a new limit gets alerts of its own.
            var changed = existing
            changed.definition = definition
            changed.eventID = event.id
            if existing.definition.limit != definition.limit || existing.definition.alertAt != definition.alertAt {
                changed.declaredAt = positioned.position
                changed.declaredTime = event.time
            }
            state.budgets[key.customerID, default: [:]][key.name] = changed
        } else {
            if existing != nil { clearUsage(of: key, state: &state, result: &result) }
            state.budgets[key.customerID, default: [:]][key.name] =
                DeclaredBudget(definition: definition, eventID: event.id, declaredAt: positioned.position, declaredTime: event.time)
        }
        result.touchedBudgets.insert(key)
    }

    /// The hours an anomaly watch's hour is compared with.
    public static func baselineKeys(of key: BudgetUsageKey, _ rule: AnomalyRule) -> [BudgetUsageKey] {
        let hour = key.period.end - key.period.start
        return (1...rule.baselineHours).map {
            BudgetUsageKey(budget: key.budget, period: BillingPeriod(start: key.period.start - Int64($0) * hour, end: key.period.end - Int64($0) * hour),
                           value: key.value)
        }
    }

    private static func clearUsage(of key: BudgetKey, state: inout BudgetState, result: inout BudgetResult) {
        result.clearedUsage.insert(key)
        // Keys stay loaded, at 0: nothing stored survives the clearing.
        for usageKey in state.usage.keys where usageKey.budget == key { state.usage[usageKey] = 0 }
        result.touchedUsage = result.touchedUsage.filter { $0.budget != key }
    }

    private static func count(_ positioned: PositionedEvent, budgets: [String: DeclaredBudget], charge: (currency: Currency, nanos: Int64)?,
                              profiles: [String: BillingProfile], state: inout BudgetState, result: inout BudgetResult) {
        let event = positioned.event
        for declared in budgets.values.sorted(by: { $0.definition.name < $1.definition.name }) {
            let definition = declared.definition
            guard let value = definition.counter(of: event) else { continue }
            let amount = definition.amount(of: event, charge: charge)
            guard amount != 0 else { continue }
            let profile = profiles[event.subject] ?? BillingProfile(customerID: event.subject)
            let key = BudgetUsageKey(budget: BudgetKey(customerID: event.subject, name: definition.name),
                                     period: definition.period.containing(event.time.microseconds, profile: profile), value: value)
            let before = state.usage[key] ?? 0
            let after = Money.saturatingAdd(before, amount)
            state.usage[key] = after
            result.touchedUsage.insert(key)
            if let rule = definition.anomaly {
                // The hours before as they stand at this point of the log: a replay compares the same.
                let baselineSum = baselineKeys(of: key, rule).reduce(Int64(0)) { Money.saturatingAdd($0, state.usage[$1] ?? 0) }
                if !rule.isAnomalous(before, baselineSum: baselineSum, floor: definition.limit)
                    && rule.isAnomalous(after, baselineSum: baselineSum, floor: definition.limit) {
                    let hours = Int128(rule.baselineHours)
                    let mean = Int64((Int128(baselineSum) * 2 + hours) / (hours * 2))
                    let ratio = mean > 0 ? min(Int128(Int32.max), Int128(after) * 100 / Int128(mean)) : 0
                    result.alerts.append(BudgetAlert(budget: key.budget, definition: definition, percent: Int(ratio), used: after, period: key.period,
                                                     crossedAt: event.time.microseconds, position: positioned.position, declaredAt: declared.declaredAt,
                                                     value: value, baseline: mean))
                }
                continue
            }
            // Crossed upwards: before < p% of the limit <= after (in Int128: no overflow).
            let limit = Int128(definition.limit)
            for percent in Set(definition.alertAt + [100]).sorted()
            where Int128(before) * 100 < Int128(percent) * limit && Int128(percent) * limit <= Int128(after) * 100 {
                result.alerts.append(BudgetAlert(budget: key.budget, definition: definition, percent: percent, used: after, period: key.period,
                                                 crossedAt: event.time.microseconds, position: positioned.position, declaredAt: declared.declaredAt,
                                                 value: value, baseline: nil))
            }
        }
    }
}
