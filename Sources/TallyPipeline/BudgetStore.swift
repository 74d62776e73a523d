import TallyCore
import TallyPostgres

/// How budgets are stored in `tally.budgets` (migration 0023), read back by the rater, the
/// gateway's budget guard and the CLI.
public enum BudgetRow {
    /// The columns `decode` reads, in its order (unqualified).
    public static let columns = """
        customer_id, budget, period, measure, unit, limit_value, array_to_string(alert_at, ','), enforced, dimensions::text, event_id, \
        declared_partition, declared_offset, \(microseconds("declared_at")), per, anomaly_factor_percent, baseline_hours
        """

    /// The budget in the `columns` of `row`, starting at column `first`.
    public static func decode(_ result: PostgresResult, row: Int, from first: Int = 0) throws -> (customerID: String, budget: DeclaredBudget) {
        let name = try result.value(row, first + 1, as: String.self)
        let measure = try Self.measure(result, row: row, kind: first + 3, unit: first + 4)
        var dimensions: [String: String] = [:]
        if case .success(.object(let members)) = JSONValue.parse(Array(try result.value(row, first + 8, as: String.self).utf8)) {
            for (key, value) in members { dimensions[key] = value.string }
        }
        let definition = BudgetDefinition(
            name: name, period: try result.value(row, first + 2, parsedBy: BudgetPeriod.init(rawValue:)), measure: measure,
            limit: try result.value(row, first + 5, as: Int64.self),
            alertAt: (result.string(row, first + 6) ?? "").split(separator: ",").compactMap { Int($0) },
            enforced: try result.value(row, first + 7, as: Bool.self), dimensions: dimensions, per: result.string(row, first + 13),
            anomaly: try result.int64(row, first + 14).map { AnomalyRule(factorPercent: Int($0), baselineHours: Int(try result.int64(row, first + 15) ?? 24)) })
        let declared = DeclaredBudget(
            definition: definition, eventID: try result.value(row, first + 9, as: String.self),
            declaredAt: LogPosition(partition: Int32(try result.value(row, first + 10, as: Int64.self)), offset: try result.value(row, first + 11, as: Int64.self)),
            declaredTime: EventTime(microseconds: try result.value(row, first + 12, as: Int64.self)))
        return (try result.value(row, first, as: String.self), declared)
    }

    /// The measure in columns `kind` and `unit` of `row` (`measure`, `unit` of the budget tables).
    public static func measure(_ result: PostgresResult, row: Int, kind: Int, unit: Int) throws -> BudgetMeasure {
        let unitText = try result.value(row, unit, as: String.self)
        return try result.value(row, kind) { BudgetMeasure(kind: $0, unit: unitText) }
    }

    /// The dimensions as a JSON object with sorted keys (stored as jsonb).
    public static func dimensionsJSON(_ definition: BudgetDefinition) -> String {
        var json = JSONWriter(capacity: 64)
        json.raw("{")
        for (index, (key, value)) in definition.dimensions.sorted(by: { $0.key < $1.key }).enumerated() {
            json.key(key, first: index == 0); json.string(value)
        }
        json.raw("}")
        return String(decoding: json.bytes, as: UTF8.self)
    }
}

/// A budget and where it stands in one period.
public struct BudgetStanding: Sendable, Equatable {
    public let customerID: String
    public let budget: DeclaredBudget
    public let period: BillingPeriod
    /// For a budget per value (`per`): the value counted, `""` for one without usage yet.
    public let value: String
    /// Counted by the rater so far in `period` (same units as the limit).
    public let used: Int64

    public init(customerID: String, budget: DeclaredBudget, period: BillingPeriod, value: String = "", used: Int64) {
        self.customerID = customerID
        self.budget = budget
        self.period = period
        self.value = value
        self.used = used
    }

    public var definition: BudgetDefinition { budget.definition }
    /// What is left before the limit (negative once past it).
    public var remaining: Int64 { Int64(clamping: Int128(definition.limit) - Int128(used)) }
}

/// Reads budgets and their usage (the rater's tables) for tools and the gateway.
public struct BudgetStore {
    public let connection: PostgresConnection

    public init(connection: PostgresConnection) { self.connection = connection }

    /// Every budget of `customerID` (all customers when nil) with its usage in the period holding
    /// `now` (microseconds since the epoch), ordered by customer and name. A budget per value
    /// (`per`) stands at `call`'s value (it is left out when `call` has none), or without a call
    /// at its most used value.
    public func standings(customerID: String?, at now: Int64, call: UsageEvent? = nil) throws -> [BudgetStanding] {
        let rows = try connection.query("""
            SELECT \(BudgetRow.columns) FROM budgets WHERE $1::text IS NULL OR customer_id = $1 ORDER BY customer_id, budget
            """, [customerID])
        // The counter each budget stands at: `call`'s, or nil for the most used one.
        var budgets: [(customerID: String, budget: DeclaredBudget)] = []
        var values: [String?] = []
        for row in 0..<rows.rowCount {
            let decoded = try BudgetRow.decode(rows, row: row)
            if let call, decoded.budget.definition.per != nil {
                guard let value = decoded.budget.definition.counter(of: call) else { continue }
                values.append(value)
            } else {
                values.append(decoded.budget.definition.per == nil ? "" : nil)
            }
            budgets.append(decoded)
        }
        guard !budgets.isEmpty else { return [] }
        let profiles = try BillingCatalogStore(connection: connection).profiles(Array(Set(budgets.map(\.customerID))))
        let periods = budgets.map { $0.budget.definition.period.containing(now, profile: profiles[$0.customerID] ?? BillingProfile(customerID: $0.customerID)) }
        let used = try connection.query("""
            SELECT k.i, u.value, u.used FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) WITH ORDINALITY AS k(c, b, p, v, i)
            CROSS JOIN LATERAL (
                SELECT value, used FROM budget_usage u
                WHERE u.customer_id = k.c AND u.budget = k.b AND u.period_start = \(microsecondsToTimestamp) k.p AND (k.v IS NULL OR u.value = k.v)
                ORDER BY used DESC, value LIMIT 1) u
            """, [PostgresArray(budgets.map(\.customerID)), PostgresArray(budgets.map(\.budget.definition.name)), PostgresArray(periods.map(\.start)),
                  PostgresArray(values)])
        var usage: [Int: (value: String, used: Int64)] = [:]
        for row in 0..<used.rowCount {
            usage[Int(try used.value(row, 0, as: Int64.self)) - 1] = (try used.value(row, 1, as: String.self), try used.value(row, 2, as: Int64.self))
        }
        return budgets.indices.map {
            BudgetStanding(customerID: budgets[$0].customerID, budget: budgets[$0].budget, period: periods[$0],
                           value: usage[$0]?.value ?? values[$0] ?? "", used: usage[$0]?.used ?? 0)
        }
    }
}
