import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

/// The read and management API (docs/api.md): usage, wallets, invoices, alerts, customers, price
/// books and consumer positions, answered from PostgreSQL. Every route is in `openapi.yaml`.
extension IngestService {
    /// Who may call a read route.
    enum ReadAccess {
        /// A `read` key of no customer or of the customer in the path (a portal token), or an admin key.
        case customer
        /// A `read` key of no customer, or an admin key.
        case operators
        /// An `admin` key.
        case admin
    }

    /// A query parameter or body field at fault: answered 400 naming it.
    struct InvalidParameter: Error {
        let name: String
        let reason: String
    }

    /// What a read handler gets: the request, the customer of the path, the query parameters.
    struct ReadCall: Sendable {
        let request: Request
        let customer: String
        /// Path parameters other than the customer (`invoice`, `book`, `version`), percent-decoded once.
        let path: [String: String]
        let parameters: [String: String]

        func parameter(_ name: String) -> String? { parameters[name] }

        /// `limit`: 1 to 1,000 rows a page, 100 when absent.
        func limit() throws -> Int {
            guard let text = parameter("limit") else { return 100 }
            guard let value = Int(text), (1...1000).contains(value) else { throw InvalidParameter(name: "limit", reason: "must be a whole number from 1 to 1000") }
            return value
        }

        /// What each part of a list's cursor holds.
        enum CursorPart { case text, time, int32, int64 }

        /// `cursor`: a `next_cursor` of the same list, its parts as `parts` say (a time within
        /// the years 1 to 9999, whole numbers in range); anything else is refused, never read as
        /// the first page.
        func cursor(_ parts: [CursorPart]) throws -> [String]? {
            guard let text = parameter("cursor") else { return nil }
            let refused = InvalidParameter(name: "cursor", reason: "is not a next_cursor of this list; pass it back unchanged")
            guard let values = PageCursor.decode(text, count: parts.count) else { throw refused }
            for (part, value) in zip(parts, values) {
                switch part {
                case .text: continue
                case .time: guard let time = Int64(value), EventTime.supportedRange.contains(time) else { throw refused }
                case .int32: guard Int32(value) != nil else { throw refused }
                case .int64: guard Int64(value) != nil else { throw refused }
                }
            }
            return values
        }

        /// An RFC 3339 time with offset, in microseconds.
        func time(_ name: String) throws -> Int64? {
            guard let text = parameter(name) else { return nil }
            guard let time = EventTime(text), EventTime.supportedRange.contains(time.microseconds) else {
                throw InvalidParameter(name: name, reason: "must be an RFC 3339 time with offset in the years 1 to 9999, e.g. 2026-11-01T00:00:00Z")
            }
            return time.microseconds
        }
    }

    func registerReadRoutes(on router: Router<BasicRequestContext>) {
        router.get("openapi.json") { _, _ in
            Response(status: .ok, headers: [.contentType: "application/json", .cacheControl: "no-cache"],
                     body: .init(byteBuffer: ByteBuffer(bytes: OpenAPIDocument.json)))
        }
        read(router, "v1/customers", .operators) { call in
            let limit = try call.limit(), after = try call.cursor([.text])?[0]
            return try await self.answer { connection in
                let page = try AccountReader(connection: connection).customers(after: after, limit: limit)
                return Self.page(page.rows.map { Self.customerJSON($0.profile, configured: $0.configured) }, next: page.nextCursor)
            }
        }
        read(router, "v1/customers/:customer", .customer) { call in
            try await self.answer { connection in
                let (profile, configured) = try AccountReader(connection: connection).customer(call.customer)
                return Self.customerJSON(profile, configured: configured)
            }
        }
        read(router, "v1/customers/:customer", .admin, method: .patch) { call in try await self.changeSettings(call) }
        read(router, "v1/customers/:customer/usage", .customer) { call in try await self.usage(call) }
        read(router, "v1/customers/:customer/balance", .customer) { call in
            try await self.answer { connection in
                let balances = try AccountReader(connection: connection).balances(call.customer)
                return .object([("customer", .string(call.customer)), ("balances", .array(balances.map { balance in
                    .object([("currency", .string(balance.currency.code)), ("balance", .string(Money.format(nanos: balance.balanceNanos))),
                             ("grants_remaining", .string(Money.format(nanos: balance.grantsRemainingNanos))), ("blocked", .bool(balance.blocked)),
                             ("blocked_since", .time(balance.blockedSince))])
                }))])
            }
        }
        read(router, "v1/customers/:customer/grants", .customer) { call in
            let limit = try call.limit(), cursor = try call.cursor([.time, .text])
            return try await self.answer { connection in
                let page = try AccountReader(connection: connection).grants(call.customer, cursor: cursor, limit: limit)
                let now = CreditGuard.nowMicroseconds()
                return Self.page(page.rows.map { grant in
                    .object([("grant_id", .string(grant.grantID)), ("source", .string(grant.source)), ("currency", .string(grant.currency.code)),
                             ("amount", .string(Money.format(nanos: grant.amountNanos))), ("remaining", .string(Money.format(nanos: grant.remainingNanos))),
                             ("priority", .number(grant.priority)), ("granted_at", .time(grant.grantedAt)), ("expires_at", .time(grant.expiresAt)),
                             ("expired", .bool(grant.expiresAt.map { $0 <= now } ?? false))])
                }, next: page.nextCursor)
            }
        }
        read(router, "v1/customers/:customer/ledger", .customer) { call in
            let limit = try call.limit(), cursor = try call.cursor([.int32, .int64, .int32])
            return try await self.answer { connection in
                let page = try AccountReader(connection: connection).ledger(call.customer, cursor: cursor, limit: limit)
                return Self.page(page.rows.map { entry in
                    .object([("kind", .string(entry.kind)), ("currency", .string(entry.currency.code)), ("amount", .string(Money.format(nanos: entry.amountNanos))),
                             ("grant_id", entry.grantID.map(JSONField.string) ?? .null), ("event_id", .string(entry.eventID)),
                             ("effective_at", .time(entry.effectiveAt)), ("period_start", .time(entry.periodStart)),
                             ("partition", .number(Int64(entry.partition))), ("offset", .number(entry.offset)), ("sequence", .number(Int64(entry.sequence)))])
                }, next: page.nextCursor)
            }
        }
        read(router, "v1/customers/:customer/overage", .customer) { call in
            let limit = try call.limit(), cursor = try call.cursor([.int64, .text, .time, .int32])
            return try await self.answer { connection in
                let page = try AccountReader(connection: connection).overage(call.customer, cursor: cursor, limit: limit)
                return Self.page(page.rows.map { entry in
                    .object([("day", .string(EventTime.format(microseconds: entry.day * 86_400_000_000).prefix(10).description)),
                             ("currency", .string(entry.currency.code)), ("amount", .string(Money.format(nanos: entry.amountNanos))),
                             ("period_start", .time(entry.periodStart)), ("partition", .number(Int64(entry.partition))),
                             ("events", .number(entry.entries)), ("first_offset", .number(entry.firstOffset)), ("last_offset", .number(entry.lastOffset)),
                             ("last_effective_at", .time(entry.lastEffectiveAt))])
                }, next: page.nextCursor)
            }
        }
        read(router, "v1/customers/:customer/invoices", .customer) { call in
            let limit = try call.limit(), cursor = try call.cursor([.time, .text])
            return try await self.answer { connection in
                let page = try AccountReader(connection: connection).invoices(call.customer, cursor: cursor, limit: limit)
                return Self.page(page.rows.map { invoice in
                    .object([("invoice_id", .string(invoice.invoiceID)), ("period", .string(BillingPeriod(start: invoice.periodStart, end: invoice.periodEnd).label)),
                             ("period_start", .time(invoice.periodStart)), ("period_end", .time(invoice.periodEnd)),
                             ("currency", .string(invoice.currency.code)), ("total_due", .string(invoice.currency.format(invoice.totalDueNanos))),
                             ("closed_at", .time(invoice.closedAt))])
                }, next: page.nextCursor)
            }
        }
        read(router, "v1/customers/:customer/invoices/current", .customer) { call in
            try await self.answer { connection in
                let (period, invoices, refused) = try InvoiceStore(connection: connection).draft(customerID: call.customer, now: CreditGuard.nowMicroseconds())
                return .object([("customer", .string(call.customer)), ("status", .string("draft")), ("period", .string(period.label)),
                                ("period_start", .time(period.start)), ("period_end", .time(period.end)),
                                ("invoices", .array(invoices.map { .raw(Array(InvoiceBuilder.json($0).utf8)) })),
                                ("not_built", .array(refused.map(JSONField.string)))])
            }
        }
        read(router, "v1/customers/:customer/invoices/:invoice", .customer) { call in
            guard let invoiceID = call.path["invoice"] else { return self.badPath() }
            let format = call.parameter("format") ?? (Self.prefersHTML(call.request) ? "html" : "json")
            guard ["json", "html"].contains(format) else { throw InvalidParameter(name: "format", reason: "must be json or html") }
            guard let invoice = try await self.database({ connection in
                try InvoiceStore(connection: connection).invoice(customerID: call.customer, invoiceID: invoiceID)
            }) else {
                return self.problem(.notFound, "no such invoice", "customer \"\(call.customer)\" has no invoice \"\(invoiceID)\"")
            }
            if format == "html" {
                return Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8"],
                                body: .init(byteBuffer: ByteBuffer(string: InvoiceBuilder.html(invoice))))
            }
            return self.json(.ok, .raw(Array(InvoiceBuilder.json(invoice).utf8)))
        }
        read(router, "v1/customers/:customer/alerts", .customer) { call in
            let limit = try call.limit(), cursor = try call.cursor([.time, .text])
            return try await self.answer { connection in
                let page = try AccountReader(connection: connection).alerts(call.customer, cursor: cursor, limit: limit)
                return Self.page(page.rows.map(Self.alertJSON), next: page.nextCursor)
            }
        }
        read(router, "v1/customers/:customer/portal-tokens", .admin, method: .post) { call in try await self.portalToken(call) }
        read(router, "v1/price-books", .operators) { call in
            try await self.answer { connection in
                let versions = try BillingCatalogStore(connection: connection).versions()
                return .object([("data", .array(versions.map(Self.priceBookJSON)))])
            }
        }
        read(router, "v1/price-books/:book/versions/:version", .operators) { call in
            guard let book = call.path["book"] else { return self.badPath() }
            guard let version = call.path["version"].flatMap({ Int32($0) }).map(Int.init), version > 0 else {
                return self.problem(.badRequest, "invalid path", "the version must be a whole number from 1")
            }
            return try await self.priceBookVersion(call, book: book, version: version)
        }
        read(router, "v1/price-books", .admin, method: .post) { call in try await self.applyPriceBook(call) }
        read(router, "v1/consumers", .admin) { call in try await self.consumers(call) }
    }

    /// Registers a read route: the key's scope, the customer in the path and the database are checked first.
    private func read(_ router: Router<BasicRequestContext>, _ path: String, _ access: ReadAccess, method: HTTPRequest.Method = .get,
                      _ handler: @escaping @Sendable (ReadCall) async throws -> Response) {
        router.on(RouterPath(stringLiteral: path), method: method) { request, context in
            try await self.authenticated(request, scopes: access == .admin ? [.admin] : [.read]) { key in
                // Without keys (--allow-anonymous) anyone could mint portal tokens or change prices.
                if access == .admin && self.authenticator == nil {
                    return self.problem(.forbidden, "forbidden", "admin routes need API keys; this tally-ingest runs with --allow-anonymous")
                }
                var customer = ""
                guard let named = Self.pathParameters(context) else { return self.badPath() }
                if path.contains(":customer") {
                    guard let named = Self.pathSegment(context.parameters.get("customer")) else { return self.badPath() }
                    guard Self.isCustomerID(named) else {
                        return self.problem(.badRequest, "invalid path", "a customer id is 1 to \(EventLimits.subjectLength.upperBound) characters without control characters")
                    }
                    customer = named
                }
                if let owner = key?.customerID, access != .customer || owner != customer {
                    return self.problem(.forbidden, "forbidden", access == .customer
                        ? "this key of customer \"\(owner)\" may only read customer \"\(owner)\""
                        : "a key of customer \"\(owner)\" may not use this route; use a key of no customer")
                }
                var parameters: [String: String] = [:]
                for (name, value) in request.uri.queryParameters where parameters[String(name)] == nil { parameters[String(name)] = String(value) }
                do {
                    return try await handler(ReadCall(request: request, customer: customer, path: named, parameters: parameters))
                } catch let invalid as InvalidParameter {
                    return self.fieldErrors("invalid request", "\(invalid.name) \(invalid.reason)", [FieldViolation(invalid.name, invalid.reason)])
                } catch let failure as ReadFailure {
                    return self.problem(failure)
                } catch {
                    self.logger.error("\(request.method) \(request.uri.path) failed: \(error)")
                    return self.problem(ReadFailure.failed)
                }
            }
        }
    }

    /// Why the database gave no answer, as the client should hear it.
    enum ReadFailure: Error {
        /// No connection, or it was lost: 503, retry.
        case unavailable(String)
        /// PostgreSQL refused a value the request carried (SQLSTATE class 22, data exceptions): 400.
        case refused(String)
        /// Anything else is Tally's fault: 500, logged.
        case failed
    }

    func problem(_ failure: ReadFailure) -> Response {
        switch failure {
        case .unavailable(let detail):
            var headers = HTTPFields()
            headers[.retryAfter] = "5"
            return problem(.serviceUnavailable, "database unavailable", detail, headers: headers)
        case .refused(let detail): return problem(.badRequest, "invalid request", detail)
        case .failed: return problem(.internalServerError, "internal error", "the request failed on the server; it is logged")
        }
    }

    /// Runs `body` on a read connection, answering its failure as `ReadFailure`. Reads retry on a
    /// lost connection; writes (`retrying: false`) do not, so nothing is done twice.
    func database<T: Sendable>(retrying: Bool = true, _ body: @escaping @Sendable (PostgresConnection) throws -> T) async throws -> T {
        guard let readPool else { throw ReadFailure.unavailable("this tally-ingest has no database (--database-url) to read from") }
        do {
            return try await readPool.run(retrying: retrying, body)
        } catch let error as PostgresError {
            logger.error("database request failed: \(error)")
            if error.code == .connectionFailed || error.code == .connectionLost { throw ReadFailure.unavailable("the database did not answer; retry") }
            if error.sqlState?.hasPrefix("22") == true { throw ReadFailure.refused("a value is out of the range the database can hold: \(error.message)") }
            if error.sqlState == "57014" { throw ReadFailure.unavailable("the read took longer than \(ReadPool.settings[1].value); narrow it, or retry") }
            throw ReadFailure.failed
        }
    }

    /// `body`'s JSON, answered 200.
    func answer(_ body: @escaping @Sendable (PostgresConnection) throws -> JSONField) async throws -> Response {
        json(.ok, try await database(body) as JSONField)
    }

    static func isCustomerID(_ text: String) -> Bool { EventLimits.isLabel(text, length: EventLimits.subjectLength) }

    /// A page of a list: `{"data": [...], "next_cursor": "..." | null}`.
    static func page(_ rows: [JSONField], next: String?) -> JSONField {
        .object([("data", .array(rows)), ("next_cursor", next.map(JSONField.string) ?? .null)])
    }

    /// True when the client asks for HTML before JSON (a browser following a link).
    static func prefersHTML(_ request: Request) -> Bool {
        let accept = request.headers[.accept] ?? ""
        guard let html = accept.range(of: "text/html") else { return false }
        return accept.range(of: "application/json").map { html.lowerBound < $0.lowerBound } ?? true
    }

    static func customerJSON(_ profile: BillingProfile, configured: Bool) -> JSONField {
        let policy = profile.overage.name, limit = profile.overage.limitNanos
        return .object([
            ("customer", .string(profile.customerID)), ("configured", .bool(configured)), ("plan", .string(profile.plan)),
            ("currency", .string(profile.currency.code)), ("billing_anchor_day", .number(Int64(profile.anchorDay))),
            ("subscription_fee", .string(Money.format(nanos: profile.subscriptionFeeNanos))), ("overage_policy", .string(policy)),
            ("overage_limit", limit.map { .string(Money.format(nanos: $0)) } ?? .null),
            ("low_balance_thresholds", .array(profile.lowBalanceThresholdsNanos.map { .string(Money.format(nanos: $0)) })),
            ("auto_topup", profile.autoTopUp.map { .object([("below", .string(Money.format(nanos: $0.belowNanos))),
                                                            ("amount", .string(Money.format(nanos: $0.amountNanos)))]) } ?? .null),
        ])
    }

    static func alertJSON(_ alert: AccountReader.Alert) -> JSONField {
        var fields: [(String, JSONField)] = [("alert_id", .string(alert.alertID)), ("kind", .string(alert.kind)), ("crossed_at", .time(alert.crossedAt))]
        if let currency = alert.currency {
            fields += [("currency", .string(currency.code)), ("threshold", .string(Money.format(nanos: alert.thresholdNanos ?? 0))),
                       ("balance", .string(Money.format(nanos: alert.balanceNanos ?? 0)))]
        }
        if let budget = alert.budget, let measure = alert.measure {
            fields += [("budget", .string(budget)), ("measure", .string(measure.kind)), ("unit", .string(measure.unit)),
                       ("percent", .number(alert.percent ?? 0)), ("used", .string(measure.format(alert.used ?? 0))),
                       ("limit", .string(measure.format(alert.limit ?? 0))), ("enforced", .bool(alert.enforced ?? false)),
                       ("dimensions", alert.dimensions.map { .raw(Array($0.utf8)) } ?? .object([])),
                       ("per", alert.per.map(JSONField.string) ?? .null), ("value", .string(alert.value ?? "")),
                       ("baseline", alert.baseline.map { .string(measure.format($0)) } ?? .null)]
        }
        return .object(fields)
    }

    static func priceBookJSON(_ version: PriceBookVersion) -> JSONField {
        .object([("book", .string(version.name)), ("customer", version.customerID.map(JSONField.string) ?? .null),
                  ("version", .number(Int64(version.version))), ("effective_from", .string(version.effectiveFrom)),
                  ("currency", .string(version.currency)), ("applied_at", .string(version.appliedAt))])
    }

    /// `GET /v1/customers/{customer}/usage`: token windows, or one meter's, grouped by the dimensions asked.
    func usage(_ call: ReadCall) async throws -> Response {
        let granularityText = call.parameter("granularity") ?? "day"
        guard let granularity = Granularity(rawValue: granularityText) else { throw InvalidParameter(name: "granularity", reason: "must be hour, day or month") }
        let now = CreditGuard.nowMicroseconds()
        let asked = (from: try call.time("from"), to: try call.time("to"))
        // Without bounds, this calendar month; with `to` alone, the month before it.
        let to = asked.to ?? Granularity.month.windowEnd(now)
        let from = granularity.windowStart(asked.from ?? Granularity.month.windowStart(asked.to.map { $0 - 1 } ?? now))
        guard from < to else { throw InvalidParameter(name: "to", reason: "must be after from") }
        guard EventTime.supportedRange.contains(from) else { throw InvalidParameter(name: "from", reason: "must lie in the years 1 to 9999 once rounded down to its window") }
        let span: Int64 = granularity == .hour ? 3_600_000_000 : granularity == .day ? 86_400_000_000 : 28 * 86_400_000_000
        guard (to - from) / span <= 10_000 else {
            throw InvalidParameter(name: "to", reason: "spans more than 10,000 windows of a \(granularity.rawValue): narrow from and to, or ask for a larger granularity")
        }
        var groupBy: [String] = []
        for name in (call.parameter("group_by") ?? "").split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !name.isEmpty {
            if !groupBy.contains(name) { groupBy.append(name) }
        }
        let meter = call.parameter("meter")
        let dimensions = groupBy
        if meter == nil, let unknown = groupBy.first(where: { !UsageQuery.dimensions.contains($0) }) {
            throw InvalidParameter(name: "group_by", reason: "\(unknown) is not a usage dimension: \(UsageQuery.dimensions.joined(separator: ", ")) are (a meter's declared dimensions with meter=)")
        }
        let header: [(String, JSONField)] = [
            ("customer", .string(call.customer)), ("granularity", .string(granularity.rawValue)), ("from", .time(from)), ("to", .time(to)),
            ("group_by", .array(groupBy.map(JSONField.string))), ("meter", meter.map(JSONField.string) ?? .null),
        ]
        func window(_ start: Int64) -> [(String, JSONField)] {
            [("window_start", .time(start)), ("window_end", .time(granularity.windowEnd(start)))]
        }
        if let meter {
            let rows: [MeterUsageRow]
            do {
                rows = try await database { connection in
                    try MeterUsageQuery.run(connection, meter: meter, granularity: granularity, customerID: call.customer,
                                            from: EventTime.format(microseconds: from), to: EventTime.format(microseconds: to), groupBy: dimensions)
                }
            } catch let failure as MeterUsageQuery.Failure {
                throw InvalidParameter(name: failure.isUnknownMeter ? "meter" : "group_by", reason: failure.description)
            }
            return json(.ok, .object(header + [("data", .array(rows.map { row in
                let start = EventTime(row.windowStart)?.microseconds ?? 0
                return .object(window(start) + zip(groupBy, row.dimensions).map { ($0, .string($1)) }
                    + [("value", Int128(row.value) != nil ? .raw(Array(row.value.utf8)) : .string(row.value))])
            }))]))
        }
        let rows = try await database { connection in
            try UsageQuery.run(connection, customerID: call.customer, granularity: granularity, from: from, to: to, groupBy: Set(dimensions))
        }
        return json(.ok, .object(header + [("data", .array(rows.map { row in
            .object(window(row.windowStart) + groupBy.map { name in (name, (row.dimensions[name] ?? nil).map(JSONField.string) ?? .null) } + [
                ("input_tokens", .integer(row.inputTokens)), ("output_tokens", .integer(row.outputTokens)),
                ("cache_read_input_tokens", .integer(row.cacheReadInputTokens)), ("cache_write_input_tokens", .integer(row.cacheWriteInputTokens)),
                ("reasoning_output_tokens", .integer(row.reasoningOutputTokens)), ("total_tokens", .integer(row.totalTokens)),
                ("event_count", .integer(row.eventCount)),
            ])
        }))]))
    }

    /// `PATCH /v1/customers/{customer}`: changes the billing settings given, keeps the others;
    /// answers the settings as stored.
    func changeSettings(_ call: ReadCall) async throws -> Response {
        guard let body = try await body(call.request, limit: 16 * 1024) else {
            return problem(.contentTooLarge, "request body too large", "billing settings are at most 16 KiB")
        }
        let outcome = try await database { connection -> Result<BillingProfile, InvalidSettings> in
            try connection.transaction { connection in
                let store = BillingCatalogStore(connection: connection)
                // Read and written in one transaction, under the row's lock, so concurrent changes do not undo each other.
                try connection.query("SELECT pg_advisory_xact_lock(hashtext('tally.customers'), hashtext($1))", [call.customer])
                let stored = try store.profiles([call.customer])[call.customer] ?? BillingProfile(customerID: call.customer)
                let changed = BillingSettingsChange.apply(json: body, to: stored)
                if case .success(let profile) = changed { try store.setProfile(profile) }
                return changed
            }
        }
        switch outcome {
        case .failure(let invalid): return fieldErrors("invalid billing settings", invalid.violations.map(\.description).joined(separator: "; "), invalid.violations)
        case .success(let profile):
            logger.info("billing settings of \(call.customer) changed")
            return json(.ok, Self.customerJSON(profile, configured: true))
        }
    }

    /// `POST /v1/customers/{customer}/portal-tokens`: a read-only key of the customer that lapses.
    func portalToken(_ call: ReadCall) async throws -> Response {
        guard let body = try await body(call.request, limit: 4096) else {
            return problem(.contentTooLarge, "request body too large", "a portal token request is at most 4 KiB")
        }
        var hours: Int64 = 24
        var name = "portal"
        if !body.allSatisfy({ [0x20, 0x09, 0x0a, 0x0d].contains($0) }) {
            guard case .success(.object(let fields)) = JSONValue.parse(body) else { throw InvalidParameter(name: "body", reason: "must be a JSON object") }
            for field in fields.keys.sorted() where !["expires_in_hours", "name"].contains(field) {
                throw InvalidParameter(name: field, reason: "is not a field of a portal token request: expires_in_hours and name are")
            }
            if let value = fields["expires_in_hours"] {
                guard case .integer(.value(let number)) = value, (1...8784).contains(number) else {
                    throw InvalidParameter(name: "expires_in_hours", reason: "must be a whole number of hours from 1 to 8784")
                }
                hours = number
            }
            if let value = fields["name"] {
                guard let text = value.string, EventLimits.isLabel(text, length: EventLimits.labelLength) else {
                    throw InvalidParameter(name: "name", reason: "must be 1 to \(EventLimits.labelLength.upperBound) characters without control characters")
                }
                name = text
            }
        }
        let expiresAt = CreditGuard.nowMicroseconds() + hours * 3_600_000_000
        // Not retried: after a lost reply the key may exist, and a second one would be minted.
        let (token, record) = try await database(retrying: false) { [name] connection in
            try APIKeyStore(connection: connection).create(name: name, environment: nil, scopes: [.read], customerID: call.customer, expiresAt: expiresAt)
        }
        logger.info("portal token \(record.keyID) for \(call.customer), lapses at \(record.expiresAt ?? "?")")
        return json(.created, .object([("token", .string(token)), ("key_id", .string(record.keyID)), ("customer", .string(call.customer)),
                                       ("scopes", .array([.string("read")])), ("expires_at", .time(expiresAt))]))
    }

    /// `GET /v1/price-books/{book}/versions/{version}`: the stored document and what changed from the version before.
    func priceBookVersion(_ call: ReadCall, book: String, version: Int) async throws -> Response {
        // One book: the plan, or with `customer=` that customer's override of it.
        let owner = call.parameter("customer")
        let versions = try await database { connection in try BillingCatalogStore(connection: connection).versions() }
        let chain = versions.filter { $0.name == book && $0.customerID == owner }
        guard let index = chain.firstIndex(where: { $0.version == version }) else {
            return problem(.notFound, "no such price book version", "price book \"\(book)\" has no version \(version)")
        }
        let chosen = chain[index]
        var changes: JSONField = .null
        if index > 0, let old = try? PriceBookDocument.parse(chain[index - 1].document), let new = try? PriceBookDocument.parse(chosen.document) {
            changes = .array(PriceBookDiff.lines(from: old, to: new).map(JSONField.string))
        }
        guard case .object(let summary) = Self.priceBookJSON(chosen) else { return badPath() }
        return json(.ok, .object(summary + [("changes_from_previous", changes), ("document", .raw(Array(chosen.document.utf8)))]))
    }

    /// `POST /v1/price-books[?dry_run=true]`: validates a price book (YAML or JSON) and stores it as
    /// its next version, or with `dry_run` only says what would change.
    func applyPriceBook(_ call: ReadCall) async throws -> Response {
        let dryRun: Bool
        switch call.parameter("dry_run") {
        case nil, "false": dryRun = false
        case "true": dryRun = true
        default: throw InvalidParameter(name: "dry_run", reason: "must be true or false")
        }
        guard let body = try await body(call.request, limit: 4 << 20) else {
            return problem(.contentTooLarge, "request body too large", "a price book is at most 4 MiB")
        }
        let book: PriceBook
        do {
            book = try PriceBookDocument.parse(String(decoding: body, as: UTF8.self))
        } catch {
            return fieldErrors("invalid price book", "\(error)", [FieldViolation("body", "\(error)")])
        }
        enum Outcome: Sendable { case refused(String), done(version: Int, created: Bool, changes: [String], losing: [String]) }
        // Not retried: after a lost reply a stored version would be answered as "identical".
        let outcome = try await database(retrying: false) { connection -> Outcome in
            let store = BillingCatalogStore(connection: connection)
            let chain = try store.versions(name: book.customerID ?? book.name).filter { $0.name == book.name && $0.customerID == book.customerID }
            let latest = try chain.last.map { try PriceBookDocument.parse($0.document) }
            let changes = latest.map { PriceBookDiff.lines(from: $0, to: book) } ?? ["new price book"]
            let losing = try store.modelsLosingPrice(book)
            if dryRun {
                do { try store.check(book) } catch let refusal as PriceBookRefusal { return .refused(refusal.description) }
                // What apply would do: an identical book stores nothing and stays the latest version.
                let identical = latest.map { PriceBookDocument.canonicalJSON($0) == PriceBookDocument.canonicalJSON(book) } ?? false
                return .done(version: (chain.last?.version ?? 0) + (identical ? 0 : 1), created: false, changes: changes, losing: losing)
            }
            do {
                let (version, created) = try store.apply(book)
                return .done(version: version, created: created, changes: created ? changes : ["no differences"], losing: losing)
            } catch let refusal as PriceBookRefusal {
                return .refused(refusal.description)
            }
        }
        switch outcome {
        case .refused(let reason):
            return problem(.conflict, "price book refused", reason)
        case .done(let version, let created, let changes, let losing):
            return json(created ? .created : .ok, .object([
                ("book", .string(book.name)), ("customer", book.customerID.map(JSONField.string) ?? .null), ("version", .number(Int64(version))),
                ("dry_run", .bool(dryRun)), ("created", .bool(created)), ("effective_from", .time(book.effectiveFrom.microseconds)),
                ("changes", .array(changes.map(JSONField.string))), ("models_losing_price", .array(losing.map(JSONField.string))),
            ]))
        }
    }

    /// `GET /v1/consumers`: each consumer group's stored position per partition, the log end and the lag.
    func consumers(_ call: ReadCall) async throws -> Response {
        let includeReplays: Bool
        switch call.parameter("include_replays") {
        case nil, "false": includeReplays = false
        case "true": includeReplays = true
        default: throw InvalidParameter(name: "include_replays", reason: "must be true or false")
        }
        let positions = try await database { connection in try AccountReader(connection: connection).consumerPositions(includeReplays: includeReplays) }
        // An unreachable broker leaves the log end null.
        let ends = await logEnds(positions)
        return json(.ok, .object([("data", .array(positions.map { position in
            let end = ends[TopicPartition(position.topic, position.partition)]
            return .object([("group", .string(position.group)), ("topic", .string(position.topic)), ("partition", .number(Int64(position.partition))),
                             ("next_offset", .number(position.nextOffset)), ("log_end", end.map(JSONField.number) ?? .null),
                             ("lag", end.map { .number(max(0, $0 - position.nextOffset)) } ?? .null),
                             ("committed_at", .time(position.committedAt)), ("owner", position.owner.map(JSONField.string) ?? .null)])
        }))]))
    }
}

extension JSONField {
    static let null = JSONField.raw(Array("null".utf8))

    static func bool(_ value: Bool) -> JSONField { .raw(Array((value ? "true" : "false").utf8)) }

    /// A whole number of any size (window sums pass Int64 only in theory, and stay exact).
    static func integer(_ value: Int128) -> JSONField { .raw(Array(String(value).utf8)) }

    /// RFC 3339 UTC, or null.
    static func time(_ microseconds: Int64?) -> JSONField { microseconds.map { .string(EventTime.format(microseconds: $0)) } ?? .null }
}

extension MeterUsageQuery.Failure {
    var isUnknownMeter: Bool { if case .unknownMeter = self { true } else { false } }
}
