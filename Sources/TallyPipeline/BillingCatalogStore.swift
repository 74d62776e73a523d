import TallyCore
import TallyPostgres

/// One row of `tally pricing list`.
public struct PriceBookVersion: Sendable {
    public let name: String
    public let customerID: String?
    public let version: Int
    public let effectiveFrom: String
    public let currency: String
    public let appliedAt: String
    public let document: String
}

/// Why a price book was not stored.
public struct PriceBookRefusal: Error, CustomStringConvertible {
    public let description: String
}

/// Price books and customer billing settings in PostgreSQL.
public struct BillingCatalogStore {
    public let connection: PostgresConnection

    public init(connection: PostgresConnection) { self.connection = connection }

    /// Models with usage in the 35 days before `book` takes effect (or since) that the plan's
    /// latest stored version prices and `book` would not: their events would go unpriced.
    /// Empty for a customer override (its models fall back to the plan's prices).
    public func modelsLosingPrice(_ book: PriceBook) throws -> [String] {
        guard book.customerID == nil else { return [] }
        let catalog = try loadCatalog()
        guard let previous = catalog.books.filter({ $0.name == book.name && $0.customerID == nil }).max(by: { $0.version < $1.version }) else {
            return []
        }
        // The models events name (the aggregator's windows) and the ones the rater has charged
        // (book model names), whichever consumer runs.
        let usage = try connection.query("""
            SELECT model FROM usage_windows WHERE window_start >= $1::timestamptz - interval '35 days'
            UNION SELECT model FROM rated_usage WHERE period_start + interval '1 month' > $1::timestamptz - interval '35 days'
            ORDER BY 1
            """, [book.effectiveFrom.text])
        return try (0..<usage.rowCount).map { try usage.value($0, 0, as: String.self) }.filter { previous.prices(for: $0) != nil && book.prices(for: $0) == nil }
    }

    /// Throws `PriceBookRefusal` for what `apply` would refuse, storing nothing (dry runs ask this).
    public func check(_ book: PriceBook) throws {
        guard !book.meters.isEmpty else { return }
        let declared = try MeterCatalogStore(connection: connection).latest()?.catalog ?? MeterCatalog([])
        for price in book.meters {
            guard let meter = declared.meters[price.meter] else {
                throw PriceBookRefusal(description: "meters: \(price.meter) is not a declared meter (tally meters apply, tally meters list)")
            }
            switch meter.aggregation {
            case .sum, .count: break
            default:
                throw PriceBookRefusal(description: "meters: \(price.meter) is a \(meter.aggregation.name) meter; only sum and count meters are priced")
            }
        }
    }

    /// Stores a book as the next version of its (name, customer); returns that version, or the
    /// latest one when it is identical (applying the same file twice changes nothing).
    ///
    /// Throws `PriceBookRefusal` when the book prices a meter the meter catalog does not
    /// declare as a SUM or COUNT meter: those are charged per unit over a billing period
    /// (a MAX, LATEST or UNIQUE_COUNT figure is no sum of events' quantities).
    public func apply(_ book: PriceBook) throws -> (version: Int, created: Bool) {
        try check(book)
        let document = PriceBookDocument.canonicalJSON(book)
        return try connection.transaction { connection in
            // Serializes concurrent applies of the same book (any constant prefix works).
            try connection.query("SELECT pg_advisory_xact_lock(hashtext('tally.price_books/' || $1 || '/' || $2))", [book.name, book.customerID ?? ""])
            let latest = try connection.query("""
                SELECT version, document FROM price_books WHERE book_name = $1 AND book_customer = $2 ORDER BY version DESC LIMIT 1
                """, [book.name, book.customerID ?? ""])
            if latest.rowCount == 1, latest.string(0, 1) == document { return (Int(try latest.value(0, 0, as: Int64.self)), false) }
            let version = latest.rowCount == 1 ? Int(try latest.value(0, 0, as: Int64.self)) + 1 : 1
            try connection.query("""
                INSERT INTO price_books (book_name, book_customer, version, effective_from, currency, document)
                VALUES ($1, $2, $3, $4::timestamptz, $5, $6)
                """, [book.name, book.customerID ?? "", version, book.effectiveFrom.text, book.currency.code, document])
            return (version, true)
        }
    }

    public func versions(name: String? = nil) throws -> [PriceBookVersion] {
        let result = try connection.query("""
            SELECT book_name, book_customer, version, to_char(effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                   currency, to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), document
            FROM price_books WHERE $1::text IS NULL OR book_name = $1 OR book_customer = $1
            ORDER BY book_customer, book_name, version
            """, [name])
        return try (0..<result.rowCount).map { row in
            PriceBookVersion(name: try result.value(row, 0, as: String.self), customerID: result.string(row, 1).flatMap { $0.isEmpty ? nil : $0 },
                             version: Int(try result.value(row, 2, as: Int64.self)), effectiveFrom: try result.value(row, 3, as: String.self), currency: try result.value(row, 4, as: String.self),
                             appliedAt: try result.value(row, 5, as: String.self), document: try result.value(row, 6, as: String.self))
        }
    }

    /// Every version of every book, parsed back from the stored canonical JSON.
    public func loadCatalog() throws -> PriceCatalog {
        PriceCatalog(books: try versions().map { row in
            var book = try PriceBookDocument.parse(row.document)
            book.version = row.version
            return book
        })
    }

    /// Changes whenever a book is applied; the rater reloads its catalog when it does.
    public func catalogStamp() throws -> String {
        let result = try connection.query("SELECT count(*)::text || '/' || coalesce(max(applied_at)::text, '') FROM price_books")
        return result.string(0, 0) ?? ""
    }

    // MARK: Customers

    public func setProfile(_ profile: BillingProfile) throws {
        let (policy, limit): (String, Int64?) = switch profile.overage {
        case .allow(let limit): ("allow", limit)
        case .stop: ("stop", nil)
        }
        try connection.query("""
            INSERT INTO customers (customer_id, plan, currency, billing_anchor_day, subscription_fee_nanos, overage_policy,
                overage_limit_nanos, low_balance_thresholds_nanos, auto_topup_below_nanos, auto_topup_amount_nanos, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::bigint[], $9, $10, now())
            ON CONFLICT (customer_id) DO UPDATE SET plan = EXCLUDED.plan, currency = EXCLUDED.currency,
                billing_anchor_day = EXCLUDED.billing_anchor_day, subscription_fee_nanos = EXCLUDED.subscription_fee_nanos,
                overage_policy = EXCLUDED.overage_policy, overage_limit_nanos = EXCLUDED.overage_limit_nanos,
                low_balance_thresholds_nanos = EXCLUDED.low_balance_thresholds_nanos,
                auto_topup_below_nanos = EXCLUDED.auto_topup_below_nanos, auto_topup_amount_nanos = EXCLUDED.auto_topup_amount_nanos,
                updated_at = now()
            """, [profile.customerID, profile.plan, profile.currency.code, Int32(profile.anchorDay), profile.subscriptionFeeNanos, policy,
                  limit, PostgresArray(profile.lowBalanceThresholdsNanos), profile.autoTopUp?.belowNanos, profile.autoTopUp?.amountNanos])
    }

    /// Stored settings of the given customers (customers without a row are absent).
    public func profiles(_ customerIDs: [String]) throws -> [String: BillingProfile] {
        guard !customerIDs.isEmpty else { return [:] }
        let result = try connection.query("""
            SELECT customer_id, plan, currency, billing_anchor_day, subscription_fee_nanos, overage_policy, overage_limit_nanos,
                   array_to_string(low_balance_thresholds_nanos, ','), auto_topup_below_nanos, auto_topup_amount_nanos
            FROM customers WHERE customer_id = ANY($1::text[])
            """, [PostgresArray(customerIDs)])
        var profiles: [String: BillingProfile] = [:]
        for row in 0..<result.rowCount {
            var profile = BillingProfile(customerID: try result.value(row, 0, as: String.self))
            profile.plan = try result.value(row, 1, as: String.self)
            profile.currency = Currency(try result.value(row, 2, as: String.self)) ?? profile.currency
            profile.anchorDay = Int(try result.value(row, 3, as: Int64.self))
            profile.subscriptionFeeNanos = try result.value(row, 4, as: Int64.self)
            profile.overage = result.string(row, 5) == "stop" ? .stop : .allow(limitNanos: try result.int64(row, 6))
            profile.lowBalanceThresholdsNanos = (result.string(row, 7) ?? "").split(separator: ",").compactMap { Int64($0) }
            if let below = try result.int64(row, 8), let amount = try result.int64(row, 9) {
                profile.autoTopUp = AutoTopUpRule(belowNanos: below, amountNanos: amount)
            }
            profiles[profile.customerID] = profile
        }
        return profiles
    }
}
