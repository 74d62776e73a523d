public enum InvoiceLineKind: String, Sendable {
    case usage, adjustment, subscription, minimum, credits
}

/// One invoice line. `exactNanos` is the unrounded amount it accounts for; `amountNanos` is
/// that rounded to the currency's minor unit, and the invoice total is the sum of those.
public struct InvoiceLine: Hashable, Sendable {
    public let kind: InvoiceLineKind
    public let description: String
    /// The billing period the line accounts for (earlier than the invoice's for adjustments).
    public let coversPeriodStart: Int64
    public let item: PriceItem?
    public let quantity: Int64?
    public let unitPrice: String?
    public let exactNanos: Int64
    public let amountNanos: Int64

    public init(kind: InvoiceLineKind, description: String, coversPeriodStart: Int64, item: PriceItem?, quantity: Int64?,
                unitPrice: String?, exactNanos: Int64, amountNanos: Int64) {
        self.kind = kind
        self.description = description
        self.coversPeriodStart = coversPeriodStart
        self.item = item
        self.quantity = quantity
        self.unitPrice = unitPrice
        self.exactNanos = exactNanos
        self.amountNanos = amountNanos
    }
}

/// Rated usage of one price item in one period, as stored.
public struct RatedCharge: Hashable, Sendable {
    public let periodStart: Int64
    public let item: PriceItem
    public let quantity: Int64
    public let amountNanos: Int64
    public let pricing: String

    public init(periodStart: Int64, item: PriceItem, quantity: Int64, amountNanos: Int64, pricing: String) {
        self.periodStart = periodStart
        self.item = item
        self.quantity = quantity
        self.amountNanos = amountNanos
        self.pricing = pricing
    }
}

/// What is already on earlier invoices for one price item of one period.
public struct InvoicedCharge: Hashable, Sendable {
    public let periodStart: Int64
    public let item: PriceItem
    /// Sums over invoices, so 128 bits.
    public let quantity: Int128
    public let exactNanos: Int128

    public init(periodStart: Int64, item: PriceItem, quantity: Int128, exactNanos: Int128) {
        self.periodStart = periodStart
        self.item = item
        self.quantity = quantity
        self.exactNanos = exactNanos
    }
}

/// Everything closing one customer's period needs, read from PostgreSQL.
public struct InvoiceInputs: Sendable {
    public var customerID: String
    public var period: BillingPeriod
    public var currency: Currency
    public var subscriptionFeeNanos: Int64 = 0
    public var minimumNanos: Int64?
    /// Rated usage of this period and of earlier periods that already have an invoice.
    public var charges: [RatedCharge] = []
    /// Usage lines and adjustments on earlier invoices, per period and item.
    public var invoiced: [InvoicedCharge] = []
    /// Wallet credit drawn per period (grant-funded debits), and what earlier invoices applied.
    /// Sums of many ledger entries or invoice lines: 128 bits, they can pass `Int64`.
    public var creditsDrawn: [Int64: Int128] = [:]
    public var creditsInvoiced: [Int64: Int128] = [:]

    public init(customerID: String, period: BillingPeriod, currency: Currency) {
        self.customerID = customerID
        self.period = period
        self.currency = currency
    }
}

public struct Invoice: Sendable {
    public let invoiceID: String
    public let customerID: String
    public let period: BillingPeriod
    public let currency: Currency
    public let lines: [InvoiceLine]

    public init(invoiceID: String, customerID: String, period: BillingPeriod, currency: Currency, lines: [InvoiceLine]) {
        self.invoiceID = invoiceID
        self.customerID = customerID
        self.period = period
        self.currency = currency
        self.lines = lines
    }

    /// The sum of the lines. `InvoiceBuilder.build` refuses an invoice whose total would not fit.
    public var totalDueNanos: Int64 { Int64(lines.reduce(Int128(0)) { $0 + Int128($1.amountNanos) }) }
    public var isEmpty: Bool { lines.isEmpty }
}

/// Why a period cannot be invoiced.
public struct InvoiceError: Error, CustomStringConvertible {
    public let message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

/// An invoice line while it is built: amounts in 128 bits until the invoice is checked.
private struct Draft {
    var kind: InvoiceLineKind
    var description: String
    var covers: Int64
    var item: PriceItem?
    var quantity: Int64?
    var unitPrice: String?
    var exact: Int128
    var amount: Int128
}

/// Builds an invoice: usage lines, adjustments for usage that arrived after an earlier period
/// was closed, the subscription fee, the minimum, and credits applied from the wallet.
public enum InvoiceBuilder {
    /// Works in 128-bit nano-units, so no sum of lines traps.
    ///
    /// - Throws: `InvoiceError` when a line or the total would exceed `Money.maxNanos` (the
    ///   range invoices are stored in); nothing is built then.
    public static func build(_ inputs: InvoiceInputs) throws(InvoiceError) -> Invoice {
        let currency = inputs.currency
        var lines: [Draft] = []
        func line(_ kind: InvoiceLineKind, _ description: String, covers: Int64, item: PriceItem? = nil, quantity: Int64? = nil,
                  unitPrice: String? = nil, exact: Int128) {
            lines.append(Draft(kind: kind, description: description, covers: covers, item: item, quantity: quantity,
                               unitPrice: unitPrice, exact: exact, amount: currency.roundToMinorUnit(exact)))
        }
        let current = inputs.charges.filter { $0.periodStart == inputs.period.start }.sorted { $0.item < $1.item }
        for charge in current {
            line(.usage, itemText(charge.item), covers: charge.periodStart, item: charge.item,
                 quantity: charge.quantity, unitPrice: charge.pricing, exact: Int128(charge.amountNanos))
        }
        // Late usage for closed periods: what is rated now minus what was invoiced.
        var invoiced: [String: (quantity: Int128, exact: Int128)] = [:]
        func key(_ period: Int64, _ item: PriceItem) -> String {
            "\(period)|\(item.bookName)|\(item.bookCustomer)|\(item.bookVersion)|\(item.model)|\(item.tokenType.rawValue)|\(item.contextAbove)|\(item.rule)"
        }
        for entry in inputs.invoiced {
            invoiced[key(entry.periodStart, entry.item), default: (0, 0)].quantity += entry.quantity
            invoiced[key(entry.periodStart, entry.item), default: (0, 0)].exact += entry.exactNanos
        }
        let earlier = inputs.charges.filter { $0.periodStart < inputs.period.start }
            .sorted { ($0.periodStart, $0.item) < ($1.periodStart, $1.item) }
        for charge in earlier {
            let already = invoiced[key(charge.periodStart, charge.item)] ?? (0, 0)
            let quantity = Int128(charge.quantity) - already.quantity
            let exact = Int128(charge.amountNanos) - already.exact
            guard quantity != 0 || exact != 0 else { continue }
            guard let lineQuantity = Int64(exactly: quantity) else {
                throw InvoiceError(message: "\(inputs.customerID) \(inputs.period.label): an adjustment's quantity leaves the stored range")
            }
            let periodLabel = BillingPeriod(start: charge.periodStart, end: charge.periodStart).label
            // Same quantity, other amount: the period was re-rated (a replay after a price change).
            let reason = quantity == 0 ? (exact < 0 ? "Credit note" : "Debit note") + " (repricing)" : "Late usage"
            line(.adjustment, "\(reason) for \(periodLabel): \(itemText(charge.item))",
                 covers: charge.periodStart, item: charge.item, quantity: lineQuantity, unitPrice: charge.pricing, exact: exact)
        }
        // Rounded one by one, the usage lines would add up to more (or less) than their exact sum
        // rounded: six lines of 0.005 show 0.06 for 0.03 of usage. The rounding is reconciled so
        // that they add up to the rounded sum, each line staying within one minor unit of its value.
        reconcileRounding(&lines, where: { $0.kind == .usage || $0.kind == .adjustment }, unit: currency.nanosPerMinorUnit)
        if inputs.subscriptionFeeNanos > 0 {
            line(.subscription, "Subscription", covers: inputs.period.start, exact: Int128(inputs.subscriptionFeeNanos))
        }
        let usage = current.reduce(Int128(0)) { $0 + Int128($1.amountNanos) }
        if let minimum = inputs.minimumNanos, usage < Int128(minimum) {
            line(.minimum, "Minimum charge for the period (\(Money.format(nanos: minimum)) \(currency)) less usage", covers: inputs.period.start,
                 exact: Int128(minimum) - usage)
        }
        let usageLines = lines.filter { $0.kind == .usage || $0.kind == .adjustment }
        let usageRounded = usageLines.reduce(Int128(0)) { $0 + $1.amount }
        let usageExact = usageLines.reduce(Int128(0)) { $0 + $1.exact }
        var creditExact: Int128 = 0
        for period in Set(inputs.creditsDrawn.keys).union(inputs.creditsInvoiced.keys).sorted() where period <= inputs.period.start {
            let credit = (inputs.creditsDrawn[period] ?? 0) - (inputs.creditsInvoiced[period] ?? 0)
            guard credit != 0 else { continue }
            creditExact += credit
            let suffix = period == inputs.period.start ? "" : " (usage of \(BillingPeriod(start: period, end: period).label))"
            line(.credits, "Prepaid credits applied\(suffix)", covers: period, exact: -credit)
        }
        // Credit pays for usage lines only. Usage paid in full nets to zero to the cent: the credit
        // shown is the usage shown (its exact sum rounded once). Credit that pays part of it shows at
        // most what was drawn: the drawn sum rounded toward zero. The credit lines are reconciled to
        // add up to that, each within a minor unit of its own value where that suffices.
        let unit = currency.nanosPerMinorUnit
        let target = creditExact >= usageExact ? usageRounded : min(creditExact / unit * unit, usageRounded)
        let left = reconcileRounding(&lines, where: { $0.kind == .credits }, unit: unit, to: -target)
        if left != 0, let last = lines.lastIndex(where: { $0.kind == .credits }) { lines[last].amount -= left }
        guard Int64(exactly: lines.reduce(Int128(0)) { $0 + $1.amount }) != nil else {
            throw InvoiceError(message: "\(inputs.customerID) \(inputs.period.label): the total due passes the largest amount Tally stores "
                + "(\(Money.format(nanos: Money.maxNanos)) \(currency))")
        }
        var built: [InvoiceLine] = []
        for draft in lines {
            guard let exact = Int64(exactly: draft.exact), let amount = Int64(exactly: draft.amount) else {
                throw InvoiceError(message: "\(inputs.customerID) \(inputs.period.label): the line \"\(draft.description)\" passes the largest "
                    + "amount Tally stores (\(Money.format(nanos: Money.maxNanos)) \(currency))")
            }
            built.append(InvoiceLine(kind: draft.kind, description: draft.description, coversPeriodStart: draft.covers, item: draft.item,
                                     quantity: draft.quantity, unitPrice: draft.unitPrice, exactNanos: exact, amountNanos: amount))
        }
        let id = "INV-\(inputs.period.label)-\(inputs.customerID)-\(currency.code)"
        return Invoice(invoiceID: id, customerID: inputs.customerID, period: inputs.period, currency: currency, lines: built)
    }

    /// Moves rounded amounts of the selected lines by one minor unit each, fewest lines first,
    /// until they add up to `target` (default: their exact sum rounded): the lines rounded
    /// furthest in the direction of the excess give way first (ties: the later line), as in the
    /// largest-remainder method. Returns what is left when every line has moved once.
    @discardableResult
    private static func reconcileRounding(_ lines: inout [Draft], where selected: (Draft) -> Bool, unit: Int128, to target: Int128? = nil) -> Int128 {
        let indices = lines.indices.filter { selected(lines[$0]) }
        let exact = indices.reduce(Int128(0)) { $0 + lines[$1].exact }
        let target = target ?? Money.divideRounded(exact, by: unit) * unit
        var excess = indices.reduce(Int128(0)) { $0 + lines[$1].amount } - target
        guard excess != 0 else { return 0 }
        let step = excess > 0 ? unit : -unit
        // How far each line was rounded in the direction of the excess.
        let order = indices.sorted { a, b in
            let ea = (lines[a].amount - lines[a].exact) * (excess > 0 ? 1 : -1)
            let eb = (lines[b].amount - lines[b].exact) * (excess > 0 ? 1 : -1)
            return ea != eb ? ea > eb : a > b
        }
        for index in order where excess != 0 {
            lines[index].amount -= step
            excess -= step
        }
        return excess
    }

    static func label(_ type: TokenType) -> String {
        switch type {
        case .input: "input"
        case .output: "output"
        case .cacheRead: "cache read"
        case .cacheWrite: "cache write"
        case .cacheWrite1h: "cache write (1 h)"
        case .reasoning: "reasoning"
        case .meter: "meter"
        }
    }

    /// What a line charges: "gpt-4o output tokens", "vector_searches (meter)", "gpt-4o input tokens (rule batch)".
    static func itemText(_ item: PriceItem) -> String {
        (item.tokenType == .meter ? "\(item.model) (meter)" : "\(item.model) \(label(item.tokenType)) tokens\(item.contextTierText)") + item.ruleText
    }

    /// The invoice as JSON: amounts as exact decimal strings in the currency's minor unit.
    public static func json(_ invoice: Invoice) -> String {
        let currency = invoice.currency
        var json = JSONWriter()
        json.raw("{")
        json.key("invoice_id", first: true); json.string(invoice.invoiceID)
        json.key("customer_id"); json.string(invoice.customerID)
        json.key("period"); json.string(invoice.period.label)
        json.key("period_start"); json.string(EventTime.format(microseconds: invoice.period.start))
        json.key("period_end"); json.string(EventTime.format(microseconds: invoice.period.end))
        json.key("currency"); json.string(currency.code)
        json.key("lines"); json.raw("[")
        for (index, line) in invoice.lines.enumerated() {
            json.raw(index == 0 ? "\n  {" : ",\n  {")
            json.key("kind", first: true); json.string(line.kind.rawValue)
            json.key("description"); json.string(line.description)
            if let item = line.item {
                json.key("model"); json.string(item.model)
                json.key("token_type"); json.string(item.tokenType.rawValue)
                json.key("price_book"); json.string(item.bookCustomer.isEmpty ? "\(item.bookName) v\(item.bookVersion)" : "\(item.bookName) (\(item.bookCustomer)) v\(item.bookVersion)")
                if !item.rule.isEmpty { json.key("price_rule"); json.string(item.rule) }
            }
            if let quantity = line.quantity { json.key("quantity"); json.integer(quantity) }
            if let unitPrice = line.unitPrice { json.key("unit_price"); json.string(unitPrice) }
            json.key("amount"); json.string(currency.format(line.amountNanos))
            json.raw("}")
        }
        json.raw(invoice.lines.isEmpty ? "]" : "\n]")
        json.key("total_due"); json.string(currency.format(invoice.totalDueNanos))
        json.raw("}\n")
        return String(decoding: json.bytes, as: UTF8.self)
    }

    /// The invoice as a standalone, printable HTML document.
    public static func html(_ invoice: Invoice) -> String {
        let currency = invoice.currency
        let escape = ConsoleHTML.escape
        var rows = ""
        for line in invoice.lines {
            rows += "<tr class=\"\(line.kind.rawValue)\"><td>\(escape(line.description))</td><td class=\"n\">\(line.quantity.map(String.init) ?? "")</td>"
                + "<td>\(escape(line.unitPrice ?? ""))</td><td class=\"n\">\(currency.format(line.amountNanos))</td></tr>\n"
        }
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>Invoice \(escape(invoice.invoiceID))</title>
            <style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;width:100%}
            td,th{border-bottom:1px solid #ccc;padding:.4em;text-align:left}.n{text-align:right;font-variant-numeric:tabular-nums}
            tr.credits td{color:#060}tr.adjustment td{font-style:italic}tfoot td{font-weight:bold}</style></head>
            <body><h1>Invoice \(escape(invoice.invoiceID))</h1>
            <p>Customer <strong>\(escape(invoice.customerID))</strong><br>Billing period \(invoice.period.label): \
            \(EventTime.format(microseconds: invoice.period.start)) to \(EventTime.format(microseconds: invoice.period.end))<br>Currency \(currency)</p>
            <table><thead><tr><th>Item</th><th class="n">Quantity</th><th>Unit price</th><th class="n">Amount</th></tr></thead>
            <tbody>
            \(rows)</tbody>
            <tfoot><tr><td colspan="3">Total due</td><td class="n">\(currency.format(invoice.totalDueNanos)) \(currency)</td></tr></tfoot></table>
            </body></html>

            """
    }
}
