import TallyCore
import TallyPostgres

/// What the operator console's overview shows of every customer together: usage per day,
/// revenue per month, the top customers, and what the pipeline kept aside.
public struct ConsoleReader {
    public let connection: PostgresConnection

    public init(connection: PostgresConnection) { self.connection = connection }

    /// Tokens and calls per UTC day of every customer, from `from` (microseconds) on.
    public func dailyTokens(from: Int64) throws -> [(day: Int64, tokens: Int128, calls: Int128)] {
        let result = try connection.query("""
            SELECT \(microseconds("date_trunc('day', window_start, 'UTC')")), sum(total_tokens)::text, sum(event_count)::text
            FROM \(UsageQuery.exactRows) WHERE window_start >= \(microsecondsToTimestamp) $1::bigint GROUP BY 1 ORDER BY 1
            """, [from])
        return try (0..<result.rowCount).map { row in
            (try result.value(row, 0, as: Int64.self), try result.int128(row, 1) ?? 0, try result.int128(row, 2) ?? 0)
        }
    }

    /// Rated revenue per billing month and currency (usage charges, tokens and meters), from `from` on.
    public func monthlyRevenue(from: Int64) throws -> [(month: Int64, currency: Currency, nanos: Int128)] {
        let result = try connection.query("""
            SELECT \(microseconds("date_trunc('month', period_start, 'UTC')")), currency, sum(amount_nanos)::text
            FROM rated_usage WHERE period_start >= \(microsecondsToTimestamp) $1::bigint GROUP BY 1, 2 ORDER BY 1, 2
            """, [from])
        return try (0..<result.rowCount).map { row in
            (try result.value(row, 0, as: Int64.self), try result.value(row, 1, parsedBy: Currency.init), try result.int128(row, 2) ?? 0)
        }
    }

    /// The customers with the most tokens from `from` on, with their rated revenue of the billing
    /// periods starting since then (per currency, `USD 1.00` style left to the caller).
    public func topCustomers(from: Int64, limit: Int) throws -> [(customer: String, tokens: Int128, calls: Int128, revenue: [(Currency, Int128)])] {
        let result = try connection.query("""
            SELECT t.customer_id, t.tokens::text, t.calls::text,
                   (SELECT string_agg(r.currency || ':' || r.nanos, ',' ORDER BY r.currency)
                    FROM (SELECT currency, sum(amount_nanos) AS nanos FROM rated_usage
                          WHERE customer_id = t.customer_id AND period_start >= date_trunc('month', \(microsecondsToTimestamp) $1::bigint, 'UTC')
                          GROUP BY currency) r)
            FROM (SELECT customer_id, sum(total_tokens) AS tokens, sum(event_count) AS calls FROM \(UsageQuery.exactRows)
                  WHERE window_start >= \(microsecondsToTimestamp) $1::bigint GROUP BY customer_id ORDER BY 2 DESC, 1 LIMIT $2) t
            ORDER BY t.tokens DESC, t.customer_id
            """, [from, limit])
        return try (0..<result.rowCount).map { row in
            let revenue = (result.string(row, 3) ?? "").split(separator: ",").compactMap { pair -> (Currency, Int128)? in
                let parts = pair.split(separator: ":")
                guard parts.count == 2, let currency = Currency(String(parts[0])), let nanos = Int128(String(parts[1])) else { return nil }
                return (currency, nanos)
            }
            return (try result.value(row, 0, as: String.self), try result.int128(row, 1) ?? 0, try result.int128(row, 2) ?? 0, revenue)
        }
    }

    /// What the consumers kept aside or could not count: dead letters per group and reason,
    /// conflicting re-sends, unpriced events per model.
    public struct Health: Sendable {
        public var deadLetters: [(group: String, reason: String, records: Int64)] = []
        public var conflicts: Int64 = 0
        public var unpriced: [(model: String, events: Int64)] = []

        public init() {}
    }

    /// Customers with usage from `from` on.
    public func activeCustomers(from: Int64) throws -> Int64 {
        try connection.query("""
            SELECT count(DISTINCT customer_id) FROM \(UsageQuery.exactRows) WHERE window_start >= \(microsecondsToTimestamp) $1::bigint
            """, [from]).int64(0, 0) ?? 0
    }

    public func health() throws -> Health {
        var health = Health()
        let dead = try connection.query("SELECT consumer_group, reason_code, count(*) FROM dead_letters GROUP BY 1, 2 ORDER BY 1, 2")
        health.deadLetters = try (0..<dead.rowCount).map { (try dead.value($0, 0, as: String.self), try dead.value($0, 1, as: String.self), try dead.value($0, 2, as: Int64.self)) }
        health.conflicts = try connection.query("SELECT count(*) FROM event_conflicts").int64(0, 0) ?? 0
        let unpriced = try connection.query("SELECT model, count(*) FROM unpriced_usage GROUP BY 1 ORDER BY 2 DESC, 1")
        health.unpriced = try (0..<unpriced.rowCount).map { (try unpriced.value($0, 0, as: String.self), try unpriced.value($0, 1, as: Int64.self)) }
        return health
    }
}
