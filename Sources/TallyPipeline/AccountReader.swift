import Foundation
import TallyCore
import TallyPostgres

/// An opaque position in a list answered page by page: the sort key of the last row shown,
/// base64url-encoded so clients pass it back unchanged (`next_cursor` → `cursor`).
public enum PageCursor {
    public static func encode(_ parts: [String]) -> String {
        Data(parts.joined(separator: "\u{1f}").utf8).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    /// The parts, or nil when `text` is no cursor of `count` parts.
    public static func decode(_ text: String, count: Int) -> [String]? {
        guard text.count <= 2048, text.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }) else { return nil }
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
        guard let data = Data(base64Encoded: base64), let decoded = String(data: data, encoding: .utf8) else { return nil }
        let parts = decoded.split(separator: "\u{1f}", omittingEmptySubsequences: false).map(String.init)
        return parts.count == count ? parts : nil
    }
}

/// One window of token usage, grouped by some of model, feature, provider, environment, status.
public struct UsageRow: Sendable, Equatable {
    /// Window start, microseconds since the epoch (UTC boundaries).
    public let windowStart: Int64
    /// The values of the dimensions grouped by, by name; nil for an empty label.
    public let dimensions: [String: String?]
    public let inputTokens, outputTokens, cacheReadInputTokens, cacheWriteInputTokens, reasoningOutputTokens, totalTokens, eventCount: Int128
    public let customerID: String
}

/// Token usage at any granularity from the exact hourly windows (folded rows and the deltas not
/// folded yet): a window is whole or absent, never part of one.
public enum UsageQuery {
    /// The hourly rows and the deltas not folded yet, as one relation `w`: every sum over it is
    /// exact. Read directly rather than through the `usage_windows` view, whose own grouping
    /// would aggregate a customer's month twice.
    public static let exactRows = """
        (SELECT customer_id, window_start, model, feature, provider, environment, status, input_tokens, output_tokens,
                cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count
         FROM usage_windows_hourly
         UNION ALL
         SELECT customer_id, window_start, model, feature, provider, environment, status, input_tokens, output_tokens,
                cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count
         FROM usage_window_deltas) w
        """

    /// What usage may be grouped by.
    public static let dimensions = ["model", "feature", "provider", "environment", "status"]

    /// Windows overlapping `[from, to)`, each whole: a day window is returned for a `from` at noon.
    /// - Parameters:
    ///   - customerID: one customer, or every customer (one row set each) when nil.
    ///   - from, to: microseconds since the epoch; nil for no bound.
    ///   - groupBy: some of `dimensions`; the others are summed over.
    /// - Throws: `PostgresError`.
    public static func run(_ connection: PostgresConnection, customerID: String?, granularity: Granularity, from: Int64?, to: Int64?,
                           groupBy: Set<String>) throws -> [UsageRow] {
        let unit = granularity.rawValue
        let grouped = dimensions.map { groupBy.contains($0) }
        // The hour bounds let the (customer_id, window_start) key narrow the scan; the
        // truncated bounds make windows whole.
        // The window each hourly row falls in: date_bin for hours and days (UTC boundaries are
        // whole multiples from the epoch, and it is a quarter faster than date_trunc with a
        // zone), date_trunc for months. A fixed fragment per granularity, never input.
        let window = switch granularity {
        case .hour: "date_bin('1 hour', window_start, 'epoch'::timestamptz)"
        case .day: "date_bin('1 day', window_start, 'epoch'::timestamptz)"
        case .month: "date_trunc('month', window_start, 'UTC')"
        }
        // Grouped on the window's timestamp, converted to microseconds once per group, not per row.
        let query: PostgresQuery = """
            SELECT \(unescaped: microseconds("g.window_at")), g.customer_id, g.model, g.feature, g.provider, g.environment, g.status,
                   g.input::text, g.output::text, g.cache_read::text, g.cache_write::text, g.reasoning::text, g.total::text, g.events::text
            FROM (SELECT \(unescaped: window) AS window_at, customer_id,
                         CASE WHEN \(grouped[0]) THEN model END AS model, CASE WHEN \(grouped[1]) THEN NULLIF(feature, '') END AS feature,
                         CASE WHEN \(grouped[2]) THEN NULLIF(provider, '') END AS provider,
                         CASE WHEN \(grouped[3]) THEN NULLIF(environment, '') END AS environment,
                         CASE WHEN \(grouped[4]) THEN NULLIF(status, '') END AS status,
                         sum(input_tokens) AS input, sum(output_tokens) AS output, sum(cache_read_input_tokens) AS cache_read,
                         sum(cache_write_input_tokens) AS cache_write, sum(reasoning_output_tokens) AS reasoning, sum(total_tokens) AS total,
                         sum(event_count) AS events
                  FROM \(unescaped: exactRows)
                  WHERE (\(customerID)::text IS NULL OR customer_id = \(customerID)::text)
                    AND (\(from)::bigint IS NULL OR (window_start >= date_trunc(\(unit)::text, \(unescaped: microsecondsToTimestamp) \(from)::bigint, 'UTC')))
                    AND (\(to)::bigint IS NULL OR (window_start < \(unescaped: microsecondsToTimestamp) \(to)::bigint + ('1 ' || \(unit)::text)::interval
                         AND \(unescaped: window) < \(unescaped: microsecondsToTimestamp) \(to)::bigint))
                  GROUP BY 1, 2, 3, 4, 5, 6, 7) g
            ORDER BY 2, 1, 3, 4, 5, 6, 7
            """
        let result = try connection.query(bound: query)
        return try (0..<result.rowCount).map { row in
            var values: [String: String?] = [:]
            for (index, name) in dimensions.enumerated() where grouped[index] { values[name] = result.string(row, 2 + index) }
            func sum(_ column: Int) throws -> Int128 { try result.int128(row, column) ?? 0 }
            return UsageRow(windowStart: try result.value(row, 0, as: Int64.self), dimensions: values,
                            inputTokens: try sum(7), outputTokens: try sum(8), cacheReadInputTokens: try sum(9), cacheWriteInputTokens: try sum(10),
                            reasoningOutputTokens: try sum(11), totalTokens: try sum(12), eventCount: try sum(13),
                            customerID: try result.value(row, 1, as: String.self))
        }
    }
}

/// What the read API shows of one customer's account: wallets, grants, ledger, invoices,
/// alerts. Lists are answered a page at a time in a fixed order with a cursor for the next page.
public struct AccountReader {
    public let connection: PostgresConnection

    public init(connection: PostgresConnection) { self.connection = connection }

    public struct Page<Row: Sendable>: Sendable {
        public let rows: [Row]
        /// Pass back as `cursor` for the next page; nil on the last page.
        public let nextCursor: String?
    }

    /// One page: `limit + 1` rows were asked for, so a surplus row says another page follows.
    private func page<Row>(_ rows: [Row], limit: Int, key: (Row) -> [String]) -> Page<Row> {
        rows.count > limit ? Page(rows: Array(rows.prefix(limit)), nextCursor: PageCursor.encode(key(rows[limit - 1]))) : Page(rows: rows, nextCursor: nil)
    }

    // MARK: Customers

    /// Customers with settings or a wallet, by id; each with its settings (defaults when it has no row).
    public func customers(after: String?, limit: Int) throws -> Page<(profile: BillingProfile, configured: Bool)> {
        let result = try connection.query("""
            SELECT customer_id FROM (SELECT customer_id FROM customers UNION SELECT customer_id FROM wallets) c
            WHERE $1::text IS NULL OR customer_id > $1 ORDER BY customer_id LIMIT $2
            """, [after, limit + 1])
        let ids = try (0..<result.rowCount).map { try result.value($0, 0, as: String.self) }
        let profiles = try BillingCatalogStore(connection: connection).profiles(ids)
        return page(ids.map { (profiles[$0] ?? BillingProfile(customerID: $0), profiles[$0] != nil) }, limit: limit) { [$0.profile.customerID] }
    }

    /// The customer's settings and whether it has a row (`tally customers set`).
    public func customer(_ id: String) throws -> (profile: BillingProfile, configured: Bool) {
        let profile = try BillingCatalogStore(connection: connection).profiles([id])[id]
        return (profile ?? BillingProfile(customerID: id), profile != nil)
    }

    // MARK: Wallets

    public struct Balance: Sendable {
        public let currency: Currency
        public let balanceNanos: Int64
        /// Sum of what the live grants have left.
        public let grantsRemainingNanos: Int128
        public let blocked: Bool
        public let blockedSince: Int64?
    }

    /// One balance per currency the customer has a wallet in.
    public func balances(_ customer: String) throws -> [Balance] {
        let result = try connection.query("""
            SELECT w.currency, w.balance_nanos, w.blocked, \(microseconds("w.blocked_since")),
                   (SELECT coalesce(sum(g.remaining_nanos), 0)::text FROM wallet_grants g
                    WHERE g.customer_id = w.customer_id AND g.currency = w.currency AND (g.expires_at IS NULL OR g.expires_at > now()))
            FROM wallets w WHERE w.customer_id = $1 ORDER BY w.currency
            """, [customer])
        return try (0..<result.rowCount).map { row in
            Balance(currency: try result.value(row, 0, parsedBy: Currency.init), balanceNanos: try result.value(row, 1, as: Int64.self),
                    grantsRemainingNanos: try result.int128(row, 4) ?? 0, blocked: result.bool(row, 2) ?? false, blockedSince: try result.int64(row, 3))
        }
    }

    public struct GrantRow: Sendable {
        public let grantID, source: String
        public let currency: Currency
        public let amountNanos, remainingNanos, priority: Int64
        public let grantedAt: Int64
        public let expiresAt: Int64?
    }

    /// Grants, oldest first (`granted_at`, then id).
    public func grants(_ customer: String, cursor: [String]?, limit: Int) throws -> Page<GrantRow> {
        let result = try connection.query("""
            SELECT grant_id, source, currency, amount_nanos, remaining_nanos, priority, \(microseconds("granted_at")), \(microseconds("expires_at"))
            FROM wallet_grants
            WHERE customer_id = $1 AND ($2::bigint IS NULL OR (granted_at, grant_id) > (\(microsecondsToTimestamp) $2::bigint, $3::text))
            ORDER BY granted_at, grant_id LIMIT $4
            """, [customer, cursor.flatMap { Int64($0[0]) }, cursor?[1], limit + 1])
        let rows = try (0..<result.rowCount).map { row in
            GrantRow(grantID: try result.value(row, 0, as: String.self), source: try result.value(row, 1, as: String.self),
                     currency: try result.value(row, 2, parsedBy: Currency.init), amountNanos: try result.value(row, 3, as: Int64.self),
                     remainingNanos: try result.value(row, 4, as: Int64.self), priority: try result.value(row, 5, as: Int64.self),
                     grantedAt: try result.value(row, 6, as: Int64.self), expiresAt: try result.int64(row, 7))
        }
        return page(rows, limit: limit) { [String($0.grantedAt), $0.grantID] }
    }

    public struct LedgerEntry: Sendable {
        /// The record that made the entry: its partition and offset in the usage topic, and its place among the record's entries.
        public let partition: Int32
        public let offset: Int64
        public let sequence: Int32
        /// grant, usage or expiry.
        public let kind: String
        public let currency: Currency
        /// Signed: credit positive, debits negative.
        public let amountNanos: Int64
        /// The grant credited, drawn on or written off. Usage beyond every grant is not here but
        /// in the day's overage entry (`overage(_:cursor:limit:)`).
        public let grantID: String?
        /// The usage event charged (a usage entry) or the grant's id.
        public let eventID: String
        public let effectiveAt: Int64
        /// The billing period a usage debit belongs to.
        public let periodStart: Int64?
    }

    /// Ledger entries, newest first (log position, descending).
    public func ledger(_ customer: String, cursor: [String]?, limit: Int) throws -> Page<LedgerEntry> {
        let position = cursor.flatMap { parts -> (Int32, Int64, Int32)? in
            guard let p = Int32(parts[0]), let o = Int64(parts[1]), let s = Int32(parts[2]) else { return nil }
            return (p, o, s)
        }
        let result = try connection.query("""
            SELECT partition, record_offset, seq, kind, currency, amount_nanos, grant_id, event_id, \(microseconds("effective_at")), \(microseconds("period_start"))
            FROM wallet_ledger
            WHERE customer_id = $1 AND ($2::int IS NULL OR (partition, record_offset, seq) < ($2::int, $3::bigint, $4::int))
            ORDER BY partition DESC, record_offset DESC, seq DESC LIMIT $5
            """, [customer, position?.0, position?.1, position?.2, limit + 1])
        let rows = try (0..<result.rowCount).map { row in
            LedgerEntry(partition: Int32(try result.value(row, 0, as: Int64.self)), offset: try result.value(row, 1, as: Int64.self),
                        sequence: Int32(try result.value(row, 2, as: Int64.self)), kind: try result.value(row, 3, as: String.self),
                        currency: try result.value(row, 4, parsedBy: Currency.init), amountNanos: try result.value(row, 5, as: Int64.self),
                        grantID: result.string(row, 6), eventID: try result.value(row, 7, as: String.self),
                        effectiveAt: try result.value(row, 8, as: Int64.self), periodStart: try result.int64(row, 9))
        }
        return page(rows, limit: limit) { [String($0.partition), String($0.offset), String($0.sequence)] }
    }

    /// One `wallet_overage` entry: a day's charges beyond every grant (migration 0027).
    public struct OverageEntry: Sendable {
        /// Days since 1970-01-01 (UTC) of the events charged.
        public let day: Int64
        public let currency: Currency
        public let periodStart: Int64
        public let partition: Int32
        /// Signed like ledger entries: charges negative. A day's sum of `Int64` amounts: 128 bits.
        public let amountNanos: Int128
        /// How many charges it folds, and the offsets of the first and last record charged.
        public let entries: Int64
        public let firstOffset, lastOffset: Int64
        public let lastEffectiveAt: Int64
    }

    /// Overage entries, newest day first.
    public func overage(_ customer: String, cursor: [String]?, limit: Int) throws -> Page<OverageEntry> {
        let after = cursor.flatMap { parts -> (Int64, String, Int64, Int32)? in
            guard let day = Int64(parts[0]), let period = Int64(parts[2]), let partition = Int32(parts[3]) else { return nil }
            return (day, parts[1], period, partition)
        }
        let result = try connection.query("""
            SELECT day - date '1970-01-01', currency, \(microseconds("period_start")), partition, amount_nanos, entries, first_offset, last_offset,
                   \(microseconds("last_effective_at"))
            FROM wallet_overage
            WHERE customer_id = $1 AND ($2::bigint IS NULL OR (day - date '1970-01-01', currency, period_start, partition)
                                        < ($2::bigint, $3::text, \(microsecondsToTimestamp) $4::bigint, $5::int))
            ORDER BY day DESC, currency DESC, period_start DESC, partition DESC LIMIT $6
            """, [customer, after?.0, after?.1, after?.2, after?.3, limit + 1])
        let rows = try (0..<result.rowCount).map { row in
            OverageEntry(day: try result.value(row, 0, as: Int64.self), currency: try result.value(row, 1, parsedBy: Currency.init),
                         periodStart: try result.value(row, 2, as: Int64.self), partition: Int32(try result.value(row, 3, as: Int64.self)),
                         amountNanos: try result.value(row, 4, as: Int128.self), entries: try result.value(row, 5, as: Int64.self),
                         firstOffset: try result.value(row, 6, as: Int64.self), lastOffset: try result.value(row, 7, as: Int64.self),
                         lastEffectiveAt: try result.value(row, 8, as: Int64.self))
        }
        return page(rows, limit: limit) { [String($0.day), $0.currency.code, String($0.periodStart), String($0.partition)] }
    }

    // MARK: Invoices

    public struct InvoiceSummary: Sendable {
        public let invoiceID: String
        public let periodStart, periodEnd: Int64
        public let currency: Currency
        public let totalDueNanos: Int64
        public let closedAt: Int64
    }

    /// Closed invoices, newest period first.
    public func invoices(_ customer: String, cursor: [String]?, limit: Int) throws -> Page<InvoiceSummary> {
        let result = try connection.query("""
            SELECT invoice_id, \(microseconds("period_start")), \(microseconds("period_end")), currency, total_due_nanos, \(microseconds("closed_at"))
            FROM invoices
            WHERE customer_id = $1 AND ($2::bigint IS NULL OR (period_start, invoice_id) < (\(microsecondsToTimestamp) $2::bigint, $3::text))
            ORDER BY period_start DESC, invoice_id DESC LIMIT $4
            """, [customer, cursor.flatMap { Int64($0[0]) }, cursor?[1], limit + 1])
        let rows = try (0..<result.rowCount).map { row in
            InvoiceSummary(invoiceID: try result.value(row, 0, as: String.self), periodStart: try result.value(row, 1, as: Int64.self),
                           periodEnd: try result.value(row, 2, as: Int64.self), currency: try result.value(row, 3, parsedBy: Currency.init),
                           totalDueNanos: try result.value(row, 4, as: Int64.self), closedAt: try result.value(row, 5, as: Int64.self))
        }
        return page(rows, limit: limit) { [String($0.periodStart), $0.invoiceID] }
    }

    // MARK: Alerts

    public struct Alert: Sendable {
        public let alertID: String
        /// `balance.low`, or a budget alert's kind (`budget.threshold`, `budget.limit_reached`, `usage.runaway`, `usage.anomaly`).
        public let kind: String
        public let crossedAt: Int64
        /// A low balance: the wallet's currency, the threshold crossed and the balance then.
        public let currency: Currency?
        public let thresholdNanos, balanceNanos: Int64?
        /// A budget alert: the budget, what it counts, the percentage crossed, used and limit in the measure's units.
        public let budget: String?
        public let measure: BudgetMeasure?
        public let percent, used, limit, baseline: Int64?
        public let enforced: Bool?
        /// The budget's dimensions (a JSON object), its `per` dimension and the value counted.
        public let dimensions: String?
        public let per, value: String?
    }

    /// Low-balance and budget alerts, newest first.
    public func alerts(_ customer: String, cursor: [String]?, limit: Int) throws -> Page<Alert> {
        let result = try connection.query("""
            SELECT alert_id, kind, \(microseconds("crossed_at")), currency, threshold_nanos, balance_nanos, budget, measure, unit, percent,
                   used, limit_value, baseline, enforced, dimensions::text, per, value FROM (
                SELECT alert_id, 'balance.low' AS kind, crossed_at, currency, threshold_nanos, balance_nanos, NULL AS budget, NULL AS measure,
                       NULL AS unit, NULL::int AS percent, NULL::bigint AS used, NULL::bigint AS limit_value, NULL::bigint AS baseline,
                       NULL::boolean AS enforced, NULL::jsonb AS dimensions, NULL AS per, NULL AS value
                FROM balance_alerts WHERE customer_id = $1
                UNION ALL
                SELECT alert_id, kind, crossed_at, NULL, NULL, NULL, budget, measure, unit, percent, used, limit_value, baseline, enforced,
                       dimensions, per, value
                FROM budget_alerts WHERE customer_id = $1) a
            WHERE $2::bigint IS NULL OR (crossed_at, alert_id) < (\(microsecondsToTimestamp) $2::bigint, $3::text)
            ORDER BY crossed_at DESC, alert_id DESC LIMIT $4
            """, [customer, cursor.flatMap { Int64($0[0]) }, cursor?[1], limit + 1])
        let rows = try (0..<result.rowCount).map { row in
            Alert(alertID: try result.value(row, 0, as: String.self), kind: try result.value(row, 1, as: String.self),
                  crossedAt: try result.value(row, 2, as: Int64.self), currency: result.string(row, 3).flatMap(Currency.init),
                  thresholdNanos: try result.int64(row, 4), balanceNanos: try result.int64(row, 5), budget: result.string(row, 6),
                  measure: result.string(row, 7).flatMap { BudgetMeasure(kind: $0, unit: result.string(row, 8) ?? "") },
                  percent: try result.int64(row, 9), used: try result.int64(row, 10), limit: try result.int64(row, 11), baseline: try result.int64(row, 12),
                  enforced: result.bool(row, 13), dimensions: result.string(row, 14), per: result.string(row, 15), value: result.string(row, 16))
        }
        return page(rows, limit: limit) { [String($0.crossedAt), $0.alertID] }
    }

    // MARK: Consumers

    public struct ConsumerPosition: Sendable {
        public let group, topic: String
        public let partition: Int32
        /// The offset the group resumes from (stored in the same transaction as its state).
        public let nextOffset: Int64
        public let committedAt: Int64?
        public let owner: String?
    }

    /// Every consumer group's stored positions (replay groups included when asked).
    public func consumerPositions(includeReplays: Bool) throws -> [ConsumerPosition] {
        let result = try connection.query("""
            SELECT consumer_group, topic, partition, next_offset, \(microseconds("committed_at")), owner_instance FROM consumer_offsets
            WHERE $1 OR consumer_group NOT LIKE 'tally-replay-%' ORDER BY consumer_group, topic, partition
            """, [includeReplays])
        return try (0..<result.rowCount).map { row in
            ConsumerPosition(group: try result.value(row, 0, as: String.self), topic: try result.value(row, 1, as: String.self),
                             partition: Int32(try result.value(row, 2, as: Int64.self)), nextOffset: try result.value(row, 3, as: Int64.self),
                             committedAt: try result.int64(row, 4), owner: result.string(row, 5))
        }
    }
}
