import Logging
import TallyCore
import TallyPostgres

/// What closing periods did: the invoices made, and the periods it left alone with why.
public struct InvoiceClosing: Sendable {
    public var closed: [Invoice] = []
    /// Periods that had an invoice already (their invoice ids).
    public var alreadyClosed: [String] = []
    /// Periods that cannot be invoiced, each with its reason; the other customers were closed.
    public var refused: [String] = []
}

/// Closes billing periods into invoices and reads them back.
public struct InvoiceStore {
    public let connection: PostgresConnection
    private var catalog: BillingCatalogStore { BillingCatalogStore(connection: connection) }

    public init(connection: PostgresConnection) { self.connection = connection }

    /// Closes the period labelled `YYYY-MM` (starting on each customer's anchor day) for every
    /// customer with something to bill, or only `customerID`. Periods already closed are left alone
    /// and listed; a period that has not ended by `now` (microseconds) is refused unless `force`.
    public func close(periodLabel: String, customerID: String? = nil, now: Int64, force: Bool = false) throws -> InvoiceClosing {
        let customers = try candidates(customerID)
        let profiles = try catalog.profiles(customers)
        let priceCatalog = try catalog.loadCatalog()
        var closing = InvoiceClosing()
        for customer in customers.sorted() {
            let profile = profiles[customer] ?? BillingProfile(customerID: customer)
            guard let period = BillingPeriod.parse(periodLabel, anchorDay: profile.anchorDay) else {
                throw InvoiceError(message: "period \(periodLabel) is not YYYY-MM")
            }
            if period.end > now && !force {
                closing.refused.append("\(customer) \(period.label): the period ends \(EventTime.format(microseconds: period.end)), "
                    + "not yet (close it early with --force)")
                continue
            }
            try close(customer: customer, profile: profile, period: period, catalog: priceCatalog, into: &closing)
        }
        return closing
    }

    /// Closes every period whose end plus `grace` lies before the latest event time the rater
    /// has seen: periods close by event time, never by the wall clock (determinism).
    public func closeDue(grace: Duration) throws -> InvoiceClosing {
        let watermark = try connection.query("""
            SELECT \(microseconds("greatest((SELECT max(effective_at) FROM wallet_ledger), (SELECT max(last_effective_at) FROM wallet_overage), (SELECT max(event_time) FROM unpriced_usage))"))
            """)
        guard let latest = try watermark.int64(0, 0) else { return InvoiceClosing() }
        let cutoff = latest - grace.totalMicroseconds
        let open = try connection.query("""
            SELECT DISTINCT r.customer_id, \(microseconds("r.period_start")) FROM rated_usage r
            WHERE NOT EXISTS (SELECT 1 FROM invoices i WHERE i.customer_id = r.customer_id AND i.period_start = r.period_start)
            ORDER BY 1, 2
            """)
        let customers = Array(Set(try (0..<open.rowCount).map { try open.value($0, 0, as: String.self) }))
        let profiles = try catalog.profiles(customers)
        let priceCatalog = try catalog.loadCatalog()
        var closing = InvoiceClosing()
        for row in 0..<open.rowCount {
            let customer = try open.value(row, 0, as: String.self)
            let profile = profiles[customer] ?? BillingProfile(customerID: customer)
            let period = profile.period(containing: try open.value(row, 1, as: Int64.self))
            guard period.end <= cutoff else { continue }
            try close(customer: customer, profile: profile, period: period, catalog: priceCatalog, into: &closing)
        }
        return closing
    }

    private func candidates(_ customerID: String?) throws -> [String] {
        if let customerID { return [customerID] }
        let result = try connection.query("""
            SELECT customer_id FROM customers UNION SELECT DISTINCT customer_id FROM rated_usage
            """)
        return try (0..<result.rowCount).map { try result.value($0, 0, as: String.self) }
    }

    /// The invoices the customer's current billing period (the one holding `now`, microseconds)
    /// would have if it closed now, one per currency with something on it: the running total.
    /// Stores nothing. A period already closed early is not drafted again.
    /// `refused` says why a currency's invoice could not be built (as closing would refuse it), so a
    /// running total is never silently short.
    public func draft(customerID: String, now: Int64) throws -> (period: BillingPeriod, invoices: [Invoice], refused: [String]) {
        let profile = try catalog.profiles([customerID])[customerID] ?? BillingProfile(customerID: customerID)
        let period = profile.period(containing: now)
        var invoices: [Invoice] = [], refused: [String] = []
        for outcome in try build(customer: customerID, profile: profile, period: period, catalog: try catalog.loadCatalog(), skippingClosed: { _ in }) {
            switch outcome {
            case .success(let invoice): if !invoice.isEmpty { invoices.append(invoice) }
            case .failure(let error): refused.append(error.message)
            }
        }
        return (period, invoices, refused)
    }

    private func close(customer: String, profile: BillingProfile, period: BillingPeriod, catalog: PriceCatalog,
                       into closing: inout InvoiceClosing) throws {
        var closed: [String] = []
        let built = try build(customer: customer, profile: profile, period: period, catalog: catalog, skippingClosed: { closed.append($0) })
        closing.alreadyClosed += closed
        for outcome in built {
            switch outcome {
            case .failure(let error): closing.refused.append(error.message)
            case .success(let invoice):
                if invoice.isEmpty { continue }
                if try store(invoice) { closing.closed.append(invoice) } else { closing.alreadyClosed.append(invoice.invoiceID) }
            }
        }
    }

    /// The period's invoice in each currency the customer was rated in (and its own), built from
    /// what is stored; currencies whose period is already invoiced are skipped and named to `skippingClosed`.
    private func build(customer: String, profile: BillingProfile, period: BillingPeriod, catalog: PriceCatalog,
                       skippingClosed: (String) -> Void) throws -> [Result<Invoice, InvoiceError>] {
        var built: [Result<Invoice, InvoiceError>] = []
        let currencies = try connection.query("""
            SELECT DISTINCT currency FROM rated_usage WHERE customer_id = $1 AND period_start <= \(microsecondsToTimestamp) $2::bigint
            """, [customer, period.start])
        var currencySet = Set(try (0..<currencies.rowCount).map { try currencies.value($0, 0, parsedBy: Currency.init) })
        currencySet.insert(profile.currency)
        for currency in currencySet.sorted(by: { $0.code < $1.code }) {
            var inputs = InvoiceInputs(customerID: customer, period: period, currency: currency)
            if currency == profile.currency { inputs.subscriptionFeeNanos = profile.subscriptionFeeNanos }
            let time = EventTime(microseconds: period.start)
            let book = catalog.books.first { $0.customerID == customer && $0.effectiveFrom <= time && $0.minimumPerPeriodNanos != nil }
                ?? catalog.book(named: profile.plan, at: time)
            if let book, book.currency == currency { inputs.minimumNanos = book.minimumPerPeriodNanos }
            let existing = try connection.query("""
                SELECT invoice_id FROM invoices WHERE customer_id = $1 AND currency = $2 AND period_start = \(microsecondsToTimestamp) $3::bigint
                """, [customer, currency.code, period.start])
            if existing.rowCount > 0 {
                skippingClosed(try existing.value(0, 0, as: String.self))
                continue
            }
            try load(&inputs)
            do {
                built.append(.success(try InvoiceBuilder.build(inputs)))
            } catch {
                built.append(.failure(error))
            }
        }
        return built
    }

    /// Usage and credits of the period, plus those of earlier periods already invoiced (for adjustments).
    private func load(_ inputs: inout InvoiceInputs) throws {
        let parameters: [(any PostgresEncodable)?] = [inputs.customerID, inputs.currency.code, inputs.period.start]
        let periods = """
            (period_start = \(microsecondsToTimestamp) $3::bigint OR period_start IN
              (SELECT period_start FROM invoices WHERE customer_id = $1 AND currency = $2 AND period_start < \(microsecondsToTimestamp) $3::bigint))
            """
        let charges = try connection.query("""
            SELECT \(microseconds("period_start")), book_name, book_customer, book_version, model, token_type, context_above, price_rule,
                   quantity, amount_nanos, pricing
            FROM rated_usage WHERE customer_id = $1 AND currency = $2 AND \(periods)
            """, parameters)
        for row in 0..<charges.rowCount {
            inputs.charges.append(RatedCharge(periodStart: try charges.value(row, 0, as: Int64.self), item: try item(charges, row, from: 1),
                                              quantity: try charges.value(row, 8, as: Int64.self), amountNanos: try charges.value(row, 9, as: Int64.self),
                                              pricing: try charges.value(row, 10, as: String.self)))
        }
        let invoiced = try connection.query("""
            SELECT \(microseconds("l.covers_period_start")), l.book_name, l.book_customer, l.book_version, l.model, l.token_type,
                   coalesce(l.context_above, 0), coalesce(l.price_rule, ''), sum(l.quantity), sum(l.exact_amount_nanos)
            FROM invoice_lines l JOIN invoices i USING (invoice_id)
            WHERE i.customer_id = $1 AND i.currency = $2 AND l.kind IN ('usage', 'adjustment')
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
            """, [inputs.customerID, inputs.currency.code])
        for row in 0..<invoiced.rowCount {
            inputs.invoiced.append(InvoicedCharge(periodStart: try invoiced.value(row, 0, as: Int64.self), item: try item(invoiced, row, from: 1),
                                                  quantity: try invoiced.value(row, 8, as: Int128.self), exactNanos: try invoiced.value(row, 9, as: Int128.self)))
        }
        let drawn = try connection.query("""
            SELECT \(microseconds("period_start")), -sum(amount_nanos) FROM wallet_ledger
            WHERE customer_id = $1 AND currency = $2 AND kind = 'usage' AND grant_id IS NOT NULL AND \(periods)
            GROUP BY period_start
            """, parameters)
        for row in 0..<drawn.rowCount { inputs.creditsDrawn[try drawn.value(row, 0, as: Int64.self)] = try drawn.value(row, 1, as: Int128.self) }
        let applied = try connection.query("""
            SELECT \(microseconds("l.covers_period_start")), -sum(l.exact_amount_nanos)
            FROM invoice_lines l JOIN invoices i USING (invoice_id)
            WHERE i.customer_id = $1 AND i.currency = $2 AND l.kind = 'credits' GROUP BY 1
            """, [inputs.customerID, inputs.currency.code])
        for row in 0..<applied.rowCount { inputs.creditsInvoiced[try applied.value(row, 0, as: Int64.self)] = try applied.value(row, 1, as: Int128.self) }
    }

    /// The price item in seven columns: book name, book customer, version, model, token type, context tier, price rule.
    private func item(_ result: PostgresResult, _ row: Int, from column: Int) throws -> PriceItem {
        PriceItem(bookName: try result.value(row, column, as: String.self), bookCustomer: try result.value(row, column + 1, as: String.self),
                  bookVersion: Int(try result.value(row, column + 2, as: Int64.self)), model: try result.value(row, column + 3, as: String.self),
                  tokenType: try result.value(row, column + 4, parsedBy: TokenType.init(rawValue:)), contextAbove: try result.int64(row, column + 5) ?? 0,
                  rule: result.string(row, column + 6) ?? "")
    }

    /// Stores the invoice and its lines; false when the period was closed concurrently.
    private func store(_ invoice: Invoice) throws -> Bool {
        try connection.transaction { connection in
            let inserted = try connection.query("""
                INSERT INTO invoices (invoice_id, customer_id, period_start, period_end, currency, total_due_nanos, document)
                VALUES ($1, $2, \(microsecondsToTimestamp) $3::bigint, \(microsecondsToTimestamp) $4::bigint, $5, $6, $7)
                ON CONFLICT DO NOTHING
                """, [invoice.invoiceID, invoice.customerID, invoice.period.start, invoice.period.end, invoice.currency.code,
                      invoice.totalDueNanos, InvoiceBuilder.json(invoice)])
            guard inserted.affectedRows == 1 else { return false }
            let lines = invoice.lines
            try connection.query(bound: """
                INSERT INTO invoice_lines (invoice_id, line_no, kind, description, covers_period_start, book_name, book_customer, book_version,
                    model, token_type, context_above, price_rule, quantity, unit_price, exact_amount_nanos, amount_nanos)
                SELECT \(invoice.invoiceID), n, k, d, \(unescaped: microsecondsToTimestamp) c, b, bc, v, m, t, ca, ru, q, u, e, a
                FROM unnest(\(PostgresArray(Array(1...lines.count)))::int[], \(PostgresArray(lines.map(\.kind.rawValue)))::text[],
                            \(PostgresArray(lines.map(\.description)))::text[], \(PostgresArray(lines.map(\.coversPeriodStart)))::bigint[],
                            \(PostgresArray(lines.map(\.item?.bookName)))::text[], \(PostgresArray(lines.map(\.item?.bookCustomer)))::text[],
                            \(PostgresArray(lines.map { $0.item.map { String($0.bookVersion) } }))::int[],
                            \(PostgresArray(lines.map(\.item?.model)))::text[], \(PostgresArray(lines.map(\.item?.tokenType.rawValue)))::text[],
                            \(PostgresArray(lines.map { $0.item.map { String($0.contextAbove) } }))::bigint[],
                            \(PostgresArray(lines.map(\.item?.rule)))::text[],
                            \(PostgresArray(lines.map { $0.quantity.map(String.init) }))::bigint[], \(PostgresArray(lines.map(\.unitPrice)))::text[],
                            \(PostgresArray(lines.map(\.exactNanos)))::bigint[], \(PostgresArray(lines.map(\.amountNanos)))::bigint[])
                     AS x(n, k, d, c, b, bc, v, m, t, ca, ru, q, u, e, a)
                """)
            return true
        }
    }

    /// Stored invoices (newest period first), optionally of one customer and/or period label.
    public func list(customerID: String? = nil) throws -> [(invoiceID: String, customerID: String, period: String, currency: String, totalDue: String, closedAt: String)] {
        let result = try connection.query("""
            SELECT invoice_id, customer_id, to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM'), currency, total_due_nanos,
                   to_char(closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            FROM invoices WHERE $1::text IS NULL OR customer_id = $1 ORDER BY period_start DESC, customer_id, currency
            """, [customerID])
        return try (0..<result.rowCount).map { row in
            let currency = try result.value(row, 3, parsedBy: Currency.init)
            return (try result.value(row, 0, as: String.self), try result.value(row, 1, as: String.self), try result.value(row, 2, as: String.self), currency.code,
                    currency.format(try result.value(row, 4, as: Int64.self)), try result.value(row, 5, as: String.self))
        }
    }

    /// The stored invoice of a customer's period, rebuilt from its lines.
    public func invoice(customerID: String, periodLabel: String) throws -> Invoice? {
        try invoice(customerID: customerID, matching: "to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM') = $2", periodLabel)
    }

    /// The stored invoice with this id, if it is the customer's.
    public func invoice(customerID: String, invoiceID: String) throws -> Invoice? {
        try invoice(customerID: customerID, matching: "invoice_id = $2", invoiceID)
    }

    private func invoice(customerID: String, matching condition: String, _ value: String) throws -> Invoice? {
        let header = try connection.query("""
            SELECT invoice_id, \(microseconds("period_start")), \(microseconds("period_end")), currency FROM invoices
            WHERE customer_id = $1 AND \(condition) ORDER BY currency LIMIT 1
            """, [customerID, value])
        guard header.rowCount == 1 else { return nil }
        let invoiceID = try header.value(0, 0, as: String.self)
        let lines = try connection.query("""
            SELECT kind, description, \(microseconds("covers_period_start")), book_name, book_customer, book_version, model, token_type,
                   context_above, price_rule, quantity, unit_price, exact_amount_nanos, amount_nanos
            FROM invoice_lines WHERE invoice_id = $1 ORDER BY line_no
            """, [invoiceID])
        let parsed = try (0..<lines.rowCount).map { row in
            InvoiceLine(kind: try lines.value(row, 0, parsedBy: InvoiceLineKind.init(rawValue:)), description: try lines.value(row, 1, as: String.self),
                        coversPeriodStart: try lines.value(row, 2, as: Int64.self), item: lines.isNull(row, 3) ? nil : try item(lines, row, from: 3),
                        quantity: try lines.int64(row, 10), unitPrice: lines.string(row, 11), exactNanos: try lines.value(row, 12, as: Int64.self),
                        amountNanos: try lines.value(row, 13, as: Int64.self))
        }
        return Invoice(invoiceID: invoiceID, customerID: customerID,
                       period: BillingPeriod(start: try header.value(0, 1, as: Int64.self), end: try header.value(0, 2, as: Int64.self)),
                       currency: try header.value(0, 3, parsedBy: Currency.init), lines: parsed)
    }
}
