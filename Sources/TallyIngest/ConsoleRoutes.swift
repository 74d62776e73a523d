import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

/// The web console (docs/console.md): pages rendered here with inline SVG charts, no JavaScript.
/// Operators (a `read` or `admin` key of no customer) get `/console`: the overview, customers,
/// price books; a customer's portal token gets `/portal`: its own usage, credit and invoices.
/// The key comes as `?token=` once (kept in an HttpOnly, SameSite=Lax cookie, and the URL
/// cleaned by a redirect), from the login form, or in `Authorization`. Every figure is read with
/// the same queries as the read API, so the two agree.
extension IngestService {
    static let consoleCookie = "tally_console"

    /// Who is looking: an operator, or one customer.
    enum Viewer {
        case operatorKey
        case customer(String)
    }

    func registerConsoleRoutes(on router: Router<BasicRequestContext>) {
        router.get("console/login") { request, _ in self.loginPage(error: nil, next: Self.safeNext(request.uri.queryParameters["next"].map(String.init))) }
        router.post("console/login") { request, _ in try await self.login(request) }
        router.get("console/logout") { _, _ in
            var headers = HTTPFields()
            headers[.location] = "/console/login"
            headers[.setCookie] = "\(Self.consoleCookie)=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
            return Response(status: .seeOther, headers: headers)
        }
        console(router, "console") { viewer, _, _ in try await self.overviewPage(viewer) }
        console(router, "console/customers") { viewer, request, _ in try await self.customersPage(viewer, request) }
        console(router, "console/customers/:customer") { viewer, _, path in try await self.customerPage(viewer, customer: path["customer"] ?? "", portal: false) }
        console(router, "console/customers/:customer/invoices/:invoice") { viewer, _, path in
            try await self.invoicePage(customer: path["customer"] ?? "", invoice: path["invoice"] ?? "")
        }
        console(router, "console/price-books") { _, _, _ in try await self.priceBooksPage() }
        portal(router, "portal") { customer, _ in try await self.customerPage(.customer(customer), customer: customer, portal: true) }
        portal(router, "portal/invoices/:invoice") { customer, path in try await self.invoicePage(customer: customer, invoice: path["invoice"] ?? "") }
    }

    // MARK: Access

    /// The key the request carries, and whether it came in the URL (to be moved into the cookie).
    private func consoleKey(_ request: Request) -> (key: String, fromURL: Bool)? {
        if let token = request.uri.queryParameters["token"] { return (String(token), true) }
        if let cookie = request.cookies[Self.consoleCookie]?.value, !cookie.isEmpty { return (cookie, false) }
        if let header = request.headers[.authorization], header.lowercased().hasPrefix("bearer ") { return (String(header.dropFirst(7)), false) }
        return nil
    }

    /// Who may see a page, or what to answer instead.
    enum Access {
        case viewer(Viewer)
        /// A redirect (to the login form, or to the URL without its token), or a refusal.
        case answer(Response)
    }

    private func viewer(_ request: Request) async -> Access {
        guard let authenticator else { return .viewer(.operatorKey) }
        guard let (key, fromURL) = consoleKey(request) else { return .answer(redirect("/console/login?next=\(Self.percentEncoded(Self.ownPath(request)))")) }
        switch await authenticator.check(authorization: "Bearer " + key) {
        case .allowed(let record):
            guard record.allows(.read) else {
                return .answer(page(.forbidden, "Not allowed", "<p>This key lacks the <code>read</code> scope. Create one with <code>tally keys create --scope read</code>.</p>"))
            }
            if fromURL {
                // The token leaves the address bar and the history; the cookie carries it from here.
                var cleaned = Self.ownPath(request)
                let others = request.uri.queryParameters.filter { $0.key != "token" }
                if !others.isEmpty { cleaned += "?" + others.map { "\(Self.percentEncoded(String($0.key)))=\(Self.percentEncoded(String($0.value)))" }.joined(separator: "&") }
                var response = redirect(cleaned)
                response.headers[.setCookie] = Self.sessionCookie(key, request)
                return .answer(response)
            }
            return .viewer(record.customerID.map(Viewer.customer) ?? .operatorKey)
        case .denied:
            return .answer(redirect("/console/login?next=\(Self.percentEncoded(Self.ownPath(request)))"))
        case .unavailable:
            return .answer(page(.serviceUnavailable, "Database unavailable", "<p>API keys cannot be checked right now; reload in a few seconds.</p>"))
        }
    }

    /// An operator page: a customer's key is sent to its portal instead.
    private func console(_ router: Router<BasicRequestContext>, _ path: String,
                         _ handler: @escaping @Sendable (Viewer, Request, [String: String]) async throws -> Response) {
        router.get(RouterPath(stringLiteral: path)) { request, context in
            switch await self.viewer(request) {
            case .answer(let response): return response
            case .viewer(.customer): return self.redirect("/portal")
            case .viewer(let viewer):
                guard let parameters = Self.pathParameters(context) else { return self.page(.badRequest, "Invalid address", "<p>A path segment is not valid UTF-8.</p>") }
                return try await self.rendering { try await handler(viewer, request, parameters) }
            }
        }
    }

    /// A portal page: a customer's own; an operator previews one with `?customer=`.
    private func portal(_ router: Router<BasicRequestContext>, _ path: String,
                        _ handler: @escaping @Sendable (String, [String: String]) async throws -> Response) {
        router.get(RouterPath(stringLiteral: path)) { request, context in
            switch await self.viewer(request) {
            case .answer(let response): return response
            case .viewer(let viewer):
                let customer: String
                switch viewer {
                case .customer(let own): customer = own
                case .operatorKey:
                    guard let named = request.uri.queryParameters["customer"].map(String.init), Self.isCustomerID(named) else {
                        return self.page(.badRequest, "Which customer?", "<p>An operator previews a customer's portal with <code>?customer=ID</code>.</p>")
                    }
                    customer = named
                }
                guard let parameters = Self.pathParameters(context) else { return self.page(.badRequest, "Invalid address", "<p>A path segment is not valid UTF-8.</p>") }
                return try await self.rendering { try await handler(customer, parameters) }
            }
        }
    }

    private func rendering(_ body: () async throws -> Response) async throws -> Response {
        do {
            return try await body()
        } catch let failure as ReadFailure {
            switch failure {
            case .unavailable(let detail): return page(.serviceUnavailable, "Database unavailable", "<p>\(ConsoleHTML.escape(detail)) Reload in a few seconds.</p>")
            case .refused(let detail): return page(.badRequest, "Invalid request", "<p>\(ConsoleHTML.escape(detail))</p>")
            case .failed: return page(.internalServerError, "Internal error", "<p>The page failed on the server; it is logged.</p>")
            }
        } catch {
            logger.error("console page failed: \(error)")
            return page(.internalServerError, "Internal error", "<p>The page failed on the server; it is logged.</p>")
        }
    }

    static func pathParameters(_ context: BasicRequestContext) -> [String: String]? {
        var named: [String: String] = [:]
        for (name, value) in context.parameters {
            guard let decoded = pathSegment(String(value)) else { return nil }
            named[String(name)] = decoded
        }
        return named
    }

    /// Lax, not Strict: a customer arriving from its application's site with `?token=` must keep
    /// the cookie across the redirect. Every console route that changes nothing is a GET, and the
    /// one POST (sign-in) checks where it came from. Secure behind TLS.
    static func sessionCookie(_ key: String, _ request: Request) -> String {
        let secure = request.uri.scheme == .https || request.headers[HTTPField.Name("X-Forwarded-Proto")!]?.lowercased() == "https"
        return "\(consoleCookie)=\(key); Path=/; HttpOnly; SameSite=Lax; Max-Age=28800\(secure ? "; Secure" : "")"
    }

    /// The request's path with its leading slashes made one: `//console` is a path here, but in a
    /// Location header it would name another host.
    static func ownPath(_ request: Request) -> String {
        "/" + request.uri.path.drop { $0 == "/" }
    }

    /// Where sign-in may send a browser afterwards: a console or portal path of this server only.
    static func safeNext(_ next: String?) -> String {
        guard let next, next.unicodeScalars.allSatisfy({ $0.value > 0x20 && $0.value < 0x7f && $0 != "\\" }) else { return "/console" }
        let allowed = ["/console", "/portal"].contains(next) || ["/console/", "/console?", "/portal/", "/portal?"].contains { next.hasPrefix($0) }
        return allowed && !next.contains("//") ? next : "/console"
    }

    static func percentEncoded(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .urlQueryAllowed.subtracting(CharacterSet(charactersIn: "&=+?#"))) ?? ""
    }

    private func redirect(_ location: String) -> Response {
        var headers = HTTPFields()
        headers[.location] = location
        return Response(status: .seeOther, headers: headers)
    }

    private func html(_ status: HTTPResponse.Status, _ document: String, headers extra: HTTPFields = [:]) -> Response {
        var headers = extra
        headers[.contentType] = "text/html; charset=utf-8"
        headers[.cacheControl] = "no-store"
        // No script runs on these pages; nothing may frame them.
        headers[HTTPField.Name("Content-Security-Policy")!] = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: document)))
    }

    private func page(_ status: HTTPResponse.Status, _ title: String, _ body: String) -> Response {
        html(status, ConsoleHTML.page(title: title, navigation: [("/console", "Overview")], current: "", body: body))
    }

    static let operatorNavigation = [("/console", "Overview"), ("/console/customers", "Customers"), ("/console/price-books", "Price books"),
                                     ("/console/logout", "Sign out")]

    // MARK: Login

    private func loginPage(error: String?, next target: String) -> Response {
        let body = """
            \(error.map { "<p class=\"warn\" role=\"alert\">\(ConsoleHTML.escape($0))</p>" } ?? "")
            <form method="post" action="/console/login">
            <input type="hidden" name="next" value="\(ConsoleHTML.escape(target))">
            <p><label for="token">API key or portal token</label><br>
            <input id="token" name="token" type="password" autocomplete="off" required size="66"></p>
            <p><button type="submit">Sign in</button></p></form>
            <p>Operators use a key made with <code>tally keys create --scope read</code> (or <code>admin</code>); a customer uses the portal token it was given.</p>
            """
        return html(error == nil ? .ok : .unauthorized, ConsoleHTML.page(title: "Sign in", navigation: [], current: "", body: body))
    }

    private func login(_ request: Request) async throws -> Response {
        // A sign-in posted from another site would swap the browser's session for the sender's.
        if let site = request.headers[HTTPField.Name("Sec-Fetch-Site")!], !["same-origin", "none"].contains(site) {
            return page(.forbidden, "Not allowed", "<p>Sign in from this server's own form.</p>")
        }
        guard let body = try await self.body(request, limit: 4096) else { return loginPage(error: "The form is too large.", next: "/console") }
        var fields: [String: String] = [:]
        for pair in String(decoding: body, as: UTF8.self).split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1).map { $0.replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? "" }
            if parts.count == 2 { fields[parts[0]] = parts[1] }
        }
        let key = (fields["token"] ?? "").trimmingCharacters(in: .whitespaces)
        let next = Self.safeNext(fields["next"])
        guard let authenticator else { return redirect(next) }
        switch await authenticator.check(authorization: "Bearer " + key) {
        case .allowed(let record) where record.allows(.read):
            var response = redirect(record.customerID == nil ? next : "/portal")
            response.headers[.setCookie] = Self.sessionCookie(key, request)
            return response
        case .allowed: return loginPage(error: "This key lacks the read scope.", next: next)
        case .denied: return loginPage(error: "That key is not a live key.", next: next)
        case .unavailable: return loginPage(error: "Keys cannot be checked right now; try again shortly.", next: next)
        }
    }

    // MARK: Pages


    /// Money per currency as `USD 1.00 · EUR 2.00`, each a figure named `name-CODE`.
    static func moneyFigures(_ name: String, _ amounts: [(Currency, Int128)]) -> String {
        guard !amounts.isEmpty else { return ConsoleHTML.figure(name, shown: "none", exact: "") }
        return amounts.map { ConsoleHTML.figure("\(name)-\($0.0.code)", shown: ConsoleHTML.money($0.1, $0.0), exact: Money.format(nanos: $0.1)) }
            .joined(separator: " · ")
    }

    static func tiles(_ tiles: [(String, String)]) -> String {
        "<dl class=\"tiles\">" + tiles.map { "<div class=\"tile\"><dt>\(ConsoleHTML.escape($0.0))</dt><dd>\($0.1)</dd></div>" }.joined() + "</dl>"
    }

    static func day(_ microseconds: Int64) -> String { String(EventTime.format(microseconds: microseconds).prefix(10)) }

    /// A count as a figure, in the warning colour above `warnAbove`.
    static func count(_ name: String, _ value: Int128, warnAbove: Int128? = nil) -> String {
        let figure = ConsoleHTML.figure(name, shown: ConsoleHTML.grouped(value), exact: String(value))
        guard let warnAbove, value > warnAbove else { return figure }
        return "<span class=\"warn\">\(figure)</span>"
    }

    /// One bar per UTC day from `from` through `through`, 0 for days without usage; labelled MM-DD.
    static func dailyBars(_ values: [(Int64, Int128)], from: Int64, through: Int64) -> [(label: String, value: Int128)] {
        var byDay: [Int64: Int128] = [:]
        for (day, value) in values { byDay[day, default: 0] += value }
        return stride(from: from, through: through, by: 86_400_000_000).map { day -> (label: String, value: Int128) in
            (String(Self.day(day).suffix(5)), byDay[day] ?? 0)
        }
    }

    private func overviewPage(_ viewer: Viewer) async throws -> Response {
        let now = CreditGuard.nowMicroseconds()
        let month = Granularity.month.windowStart(now)
        let since = Granularity.day.windowStart(now) - 29 * 86_400_000_000
        let yearAgo = Granularity.month.windowStart(month - 330 * 86_400_000_000)
        struct Overview: Sendable {
            var days: [(day: Int64, tokens: Int128, calls: Int128)] = []
            var revenue: [(month: Int64, currency: Currency, nanos: Int128)] = []
            var top: [(customer: String, tokens: Int128, calls: Int128, revenue: [(Currency, Int128)])] = []
            var active = 0
            var health = ConsoleReader.Health()
            var positions: [AccountReader.ConsumerPosition] = []
        }
        let data = try await database { connection -> Overview in
            let reader = ConsoleReader(connection: connection)
            var overview = Overview()
            // From the month's start when that is earlier: on the 31st, 30 days miss the 1st.
            overview.days = try reader.dailyTokens(from: min(since, month))
            overview.revenue = try reader.monthlyRevenue(from: yearAgo)
            overview.top = try reader.topCustomers(from: month, limit: 10)
            overview.active = Int(try reader.activeCustomers(from: month))
            overview.health = try reader.health()
            overview.positions = try AccountReader(connection: connection).consumerPositions(includeReplays: false)
            return overview
        }
        let ends = await logEnds(data.positions)
        let monthDays = data.days.filter { $0.day >= month }
        let monthTokens = monthDays.reduce(Int128(0)) { $0 + $1.tokens }, monthCalls = monthDays.reduce(Int128(0)) { $0 + $1.calls }
        let monthRevenue = data.revenue.filter { $0.month == month }.map { ($0.currency, $0.nanos) }
        let lags = data.positions.map { position in ends[TopicPartition(position.topic, position.partition)].map { max(0, $0 - position.nextOffset) } }
        let worstLag = lags.compactMap { $0 }.max() ?? 0
        let deadLetters = data.health.deadLetters.reduce(Int64(0)) { $0 + $1.records }
        let unpriced = data.health.unpriced.reduce(Int64(0)) { $0 + $1.events }
        var body = Self.tiles([
            ("Tokens this month", Self.count("tokens-month", monthTokens)),
            ("Model calls this month", Self.count("calls-month", monthCalls)),
            ("Revenue this month (rated)", Self.moneyFigures("revenue-month", monthRevenue)),
            ("Customers active this month", Self.count("customers-active", Int128(data.active))),
            ("Largest consumer lag", Self.count("lag-max", Int128(worstLag), warnAbove: 0)),
            ("Dead letters", Self.count("dead-letters", Int128(deadLetters), warnAbove: 0)),
            ("Unpriced events", Self.count("unpriced", Int128(unpriced), warnAbove: 0)),
            ("Conflicting re-sends", Self.count("conflicts", Int128(data.health.conflicts), warnAbove: 0)),
        ])
        let days = Self.dailyBars(data.days.map { ($0.day, $0.tokens) }, from: since, through: Granularity.day.windowStart(now))
        body += "<h2>Usage</h2>" + ConsoleHTML.barChart(title: "Tokens per day, last 30 days (UTC)",
                                                        summary: "\(ConsoleHTML.grouped(days.reduce(0) { $0 + $1.value })) tokens in 30 days; the table of top customers follows.",
                                                        bars: days)
        for currency in Set(data.revenue.map(\.currency)).sorted(by: { $0.code < $1.code }) {
            var byMonth: [Int64: Int128] = [:]
            for row in data.revenue where row.currency == currency { byMonth[row.month, default: 0] += row.nanos }
            var months: [(label: String, value: Int128)] = []
            var start = yearAgo
            while start <= month {
                months.append((String(Self.day(start).prefix(7)), byMonth[start] ?? 0))
                start = Granularity.month.windowEnd(start)
            }
            body += ConsoleHTML.barChart(title: "Rated revenue per billing month (\(currency.code))",
                                         summary: months.map { "\($0.label): \(ConsoleHTML.money($0.value, currency))" }.joined(separator: "; "),
                                         bars: months, label: { ConsoleHTML.moneyLabel($0, currency) }, exact: { ConsoleHTML.money($0, currency) })
        }
        body += ConsoleHTML.table(caption: "Top customers this month, by tokens", headers: ["Customer", "Tokens", "Model calls", "Rated revenue"], numeric: [1, 2, 3],
                                  rows: data.top.map { row in
                                      ["<a href=\"/console/customers/\(Self.pathEncoded(row.customer))\">\(ConsoleHTML.escape(row.customer))</a>",
                                       ConsoleHTML.grouped(row.tokens), ConsoleHTML.grouped(row.calls),
                                       row.revenue.map { ConsoleHTML.money($0.1, $0.0) }.joined(separator: " · ")]
                                  }, id: "top-customers")
        body += "<h2>Pipeline</h2><div class=\"cols\"><div>"
        body += ConsoleHTML.table(caption: "Consumer positions", headers: ["Group", "Partition", "Next offset", "Log end", "Lag"], numeric: [1, 2, 3, 4],
                                  rows: zip(data.positions, lags).map { position, lag in
                                      [ConsoleHTML.escape(position.group), String(position.partition), ConsoleHTML.grouped(Int128(position.nextOffset)),
                                       ends[TopicPartition(position.topic, position.partition)].map { ConsoleHTML.grouped(Int128($0)) } ?? "unknown",
                                       lag.map { ConsoleHTML.grouped(Int128($0)) } ?? "unknown"]
                                  })
        body += "</div><div>"
        body += ConsoleHTML.table(caption: "Dead letters (records set aside, nothing of them counted)", headers: ["Group", "Reason", "Records"], numeric: [2],
                                  rows: data.health.deadLetters.map { [ConsoleHTML.escape($0.group), ConsoleHTML.escape($0.reason), ConsoleHTML.grouped(Int128($0.records))] })
        body += ConsoleHTML.table(caption: "Unpriced usage (kept aside until a price book prices the model)", headers: ["Model", "Events"], numeric: [1],
                                  rows: data.health.unpriced.map { [ConsoleHTML.escape($0.model), ConsoleHTML.grouped(Int128($0.events))] })
        body += "</div></div>"
        return html(.ok, ConsoleHTML.page(title: "Overview", navigation: Self.operatorNavigation, current: "/console", body: body))
    }

    /// Log ends of the partitions the positions name, one watermark query each off the event
    /// loop (an unreachable broker leaves them unknown).
    func logEnds(_ positions: [AccountReader.ConsumerPosition]) async -> [TopicPartition: Int64] {
        let admin = self.admin
        return await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                var ends: [TopicPartition: Int64] = [:]
                for partition in Set(positions.map { TopicPartition($0.topic, $0.partition) }) {
                    if let marks = try? admin.queryWatermarks(partition, timeout: .seconds(2)) { ends[partition] = marks.high }
                }
                continuation.resume(returning: ends)
            }
        }
    }

    /// A path segment percent-encoded for a link.
    static func pathEncoded(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/?#"))) ?? ""
    }

    private func customersPage(_ viewer: Viewer, _ request: Request) async throws -> Response {
        // A form's spaces come as `+`.
        if let wanted = request.uri.queryParameters["customer"].map({ $0.replacingOccurrences(of: "+", with: " ") }), Self.isCustomerID(wanted) {
            return redirect("/console/customers/" + Self.pathEncoded(wanted))
        }
        let after = request.uri.queryParameters["after"].map(String.init)
        let page = try await database { connection in try AccountReader(connection: connection).customers(after: after, limit: 100) }
        var body = """
            <form method="get" action="/console/customers"><p><label for="customer">Go to customer</label>
            <input id="customer" name="customer" required> <button type="submit">Show</button></p></form>
            """
        body += ConsoleHTML.table(caption: "Customers with settings or a wallet", headers: ["Customer", "Plan", "Currency", "Overage policy", "Settings"],
                                  rows: page.rows.map { row in
                                      let policy = row.profile.overage.name + (row.profile.overage.limitNanos.map { " down to -\(ConsoleHTML.money(Int128($0), row.profile.currency))" } ?? "")
                                      return ["<a href=\"/console/customers/\(Self.pathEncoded(row.profile.customerID))\">\(ConsoleHTML.escape(row.profile.customerID))</a>",
                                              ConsoleHTML.escape(row.profile.plan), row.profile.currency.code, ConsoleHTML.escape(policy), row.configured ? "set" : "defaults"]
                                  })
        if let next = page.rows.last?.profile.customerID, page.nextCursor != nil {
            body += "<p><a href=\"/console/customers?after=\(Self.percentEncoded(next))\">Next page</a></p>"
        }
        return html(.ok, ConsoleHTML.page(title: "Customers", navigation: Self.operatorNavigation, current: "/console/customers", body: body))
    }

    /// A customer's page for operators, or its own portal.
    private func customerPage(_ viewer: Viewer, customer: String, portal: Bool) async throws -> Response {
        guard Self.isCustomerID(customer) else { return page(.badRequest, "Invalid customer", "<p>A customer id is 1 to 256 characters without control characters.</p>") }
        let now = CreditGuard.nowMicroseconds()
        let month = Granularity.month.windowStart(now), monthEnd = Granularity.month.windowEnd(now)
        let since = Granularity.day.windowStart(now) - 29 * 86_400_000_000
        struct Account: Sendable {
            var profile = BillingProfile(customerID: "")
            var balances: [AccountReader.Balance] = []
            var grants: [AccountReader.GrantRow] = []
            var byModel: [UsageRow] = []
            var byFeature: [UsageRow] = []
            var daily: [UsageRow] = []
            var meters: [(name: String, unit: String, value: String)] = []
            var invoices: [AccountReader.InvoiceSummary] = []
            var draft: (period: BillingPeriod, invoices: [Invoice], refused: [String])?
            var alerts: [AccountReader.Alert] = []
        }
        let data = try await database { connection -> Account in
            let reader = AccountReader(connection: connection)
            var account = Account()
            account.profile = try reader.customer(customer).profile
            account.balances = try reader.balances(customer)
            account.grants = try reader.grants(customer, cursor: nil, limit: 1000).rows
            account.byModel = try UsageQuery.run(connection, customerID: customer, granularity: .month, from: month, to: monthEnd, groupBy: ["model"])
            account.byFeature = try UsageQuery.run(connection, customerID: customer, granularity: .month, from: month, to: monthEnd, groupBy: ["feature"])
            account.daily = try UsageQuery.run(connection, customerID: customer, granularity: .day, from: since, to: monthEnd, groupBy: [])
            if let catalog = try MeterCatalogStore(connection: connection).latest()?.catalog {
                for meter in catalog.meters.values.sorted(by: { $0.name < $1.name }) {
                    let rows = try MeterUsageQuery.run(connection, meter: meter.name, granularity: .month, customerID: customer,
                                                       from: EventTime.format(microseconds: month), to: EventTime.format(microseconds: monthEnd))
                    account.meters.append((meter.name, meter.unit, rows.first?.value ?? "0"))
                }
            }
            account.invoices = try reader.invoices(customer, cursor: nil, limit: 24).rows
            account.draft = try InvoiceStore(connection: connection).draft(customerID: customer, now: now)
            account.alerts = portal ? [] : try reader.alerts(customer, cursor: nil, limit: 20).rows
            return account
        }
        let monthTokens = data.byModel.reduce(Int128(0)) { $0 + $1.totalTokens }, monthCalls = data.byModel.reduce(Int128(0)) { $0 + $1.eventCount }
        let draftDue = data.draft?.invoices.map { ($0.currency, Int128($0.totalDueNanos)) } ?? []
        var body = (data.draft?.refused ?? []).map { "<p class=\"warn\" role=\"alert\">The running total leaves out an invoice that could not be built: \(ConsoleHTML.escape($0))</p>" }.joined()
        body += portal ? "<p>Usage and credit of <strong>\(ConsoleHTML.escape(customer))</strong>. Figures are this calendar month (UTC) unless they say otherwise.</p>" : ""
        body += Self.tiles([
            (portal ? "Credit balance" : "Balance", Self.moneyFigures("balance", data.balances.map { ($0.currency, Int128($0.balanceNanos)) })),
            ("Credit left on grants", Self.moneyFigures("grants-remaining", data.balances.map { ($0.currency, $0.grantsRemainingNanos) })),
            ("Tokens this month", ConsoleHTML.figure("tokens-month", shown: ConsoleHTML.grouped(monthTokens), exact: String(monthTokens))),
            ("Model calls this month", ConsoleHTML.figure("calls-month", shown: ConsoleHTML.grouped(monthCalls), exact: String(monthCalls))),
            ("Due for \(data.draft?.period.label ?? "this period") so far", Self.moneyFigures("running-total", draftDue)),
        ])
        let days = Self.dailyBars(data.daily.map { ($0.windowStart, $0.totalTokens) }, from: since, through: Granularity.day.windowStart(now))
        body += ConsoleHTML.barChart(title: "Tokens per day, last 30 days (UTC)", summary: "\(ConsoleHTML.grouped(days.reduce(0) { $0 + $1.value })) tokens in 30 days, by day.", bars: days)
        func usageRows(_ rows: [UsageRow], _ dimension: String) -> [[String]] {
            rows.map { row in
                let name = (row.dimensions[dimension] ?? nil) ?? "(none)"
                return [ConsoleHTML.escape(name), ConsoleHTML.figure("usage-\(dimension)-\(name)", shown: ConsoleHTML.grouped(row.totalTokens), exact: String(row.totalTokens)),
                        ConsoleHTML.grouped(row.inputTokens), ConsoleHTML.grouped(row.outputTokens), ConsoleHTML.grouped(row.eventCount)]
            }
        }
        body += "<div class=\"cols\"><div>"
        body += ConsoleHTML.table(caption: "Usage this month by model", headers: ["Model", "Tokens", "Input", "Output", "Calls"], numeric: [1, 2, 3, 4],
                                  rows: usageRows(data.byModel, "model"), id: "usage-by-model")
        body += "</div><div>"
        body += ConsoleHTML.table(caption: "Usage this month by feature", headers: ["Feature", "Tokens", "Input", "Output", "Calls"], numeric: [1, 2, 3, 4],
                                  rows: usageRows(data.byFeature, "feature"), id: "usage-by-feature")
        body += "</div></div>"
        if !data.meters.isEmpty {
            body += ConsoleHTML.table(caption: "Meters this month", headers: ["Meter", "Quantity", "Unit"], numeric: [1], rows: data.meters.map { meter in
                [ConsoleHTML.escape(meter.name), ConsoleHTML.figure("meter-\(meter.name)", shown: Int128(meter.value).map(ConsoleHTML.grouped) ?? meter.value, exact: meter.value),
                 ConsoleHTML.escape(meter.unit)]
            }, id: "meters")
        }
        // An operator previewing the portal keeps naming the customer.
        let preview = if portal, case .operatorKey = viewer { "?customer=" + Self.percentEncoded(customer) } else { "" }
        let invoiceBase = portal ? "/portal/invoices/" : "/console/customers/\(Self.pathEncoded(customer))/invoices/"
        body += "<div class=\"cols\"><div>"
        body += ConsoleHTML.table(caption: "Credit grants", headers: ["Grant", "Amount", "Left", "Expires"], numeric: [1, 2], rows: data.grants.map { grant in
            [ConsoleHTML.escape(grant.grantID), ConsoleHTML.money(Int128(grant.amountNanos), grant.currency), ConsoleHTML.money(Int128(grant.remainingNanos), grant.currency),
             grant.expiresAt.map { EventTime.format(microseconds: $0) + ($0 <= now ? " (expired)" : "") } ?? "never"]
        }, id: "grants")
        body += "</div><div>"
        body += ConsoleHTML.table(caption: "Invoices", headers: ["Period", "Total due", "Closed"], numeric: [1], rows: data.invoices.map { invoice in
            ["<a href=\"\(invoiceBase)\(Self.pathEncoded(invoice.invoiceID))\(preview)\">\(BillingPeriod(start: invoice.periodStart, end: invoice.periodEnd).label)</a>",
             ConsoleHTML.money(Int128(invoice.totalDueNanos), invoice.currency), Self.day(invoice.closedAt)]
        }, id: "invoices")
        body += "</div></div>"
        if !portal {
            body += ConsoleHTML.table(caption: "Alerts, newest first", headers: ["When", "Kind", "What"], rows: data.alerts.map { alert in
                let what = alert.budget.map { "budget \($0): \(alert.percent ?? 0)%" }
                    ?? alert.currency.map { "balance \(ConsoleHTML.money(Int128(alert.balanceNanos ?? 0), $0)) under \(ConsoleHTML.money(Int128(alert.thresholdNanos ?? 0), $0))" } ?? ""
                return [EventTime.format(microseconds: alert.crossedAt), ConsoleHTML.escape(alert.kind), ConsoleHTML.escape(what)]
            }, id: "alerts")
            let profile = data.profile
            body += ConsoleHTML.table(caption: "Billing settings", headers: ["Setting", "Value"], rows: [
                ["Plan (price book)", ConsoleHTML.escape(profile.plan)], ["Currency", profile.currency.code], ["Billing periods start on day", String(profile.anchorDay)],
                ["Subscription fee", ConsoleHTML.money(Int128(profile.subscriptionFeeNanos), profile.currency)],
                ["Low-balance alerts at", profile.lowBalanceThresholdsNanos.map { ConsoleHTML.money(Int128($0), profile.currency) }.joined(separator: ", ")],
            ])
        }
        let navigation = portal ? [("/portal" + preview, "Usage and credit"), ("/console/logout", "Sign out")] : Self.operatorNavigation
        return html(.ok, ConsoleHTML.page(title: portal ? "Your usage" : "Customer \(customer)", navigation: navigation, current: portal ? "/portal" : "", body: body))
    }

    private func invoicePage(customer: String, invoice: String) async throws -> Response {
        guard let found = try await database({ connection in try InvoiceStore(connection: connection).invoice(customerID: customer, invoiceID: invoice) }) else {
            return page(.notFound, "No such invoice", "<p>\(ConsoleHTML.escape(customer)) has no invoice \(ConsoleHTML.escape(invoice)).</p>")
        }
        return html(.ok, InvoiceBuilder.html(found))
    }

    private func priceBooksPage() async throws -> Response {
        let versions = try await database { connection in try BillingCatalogStore(connection: connection).versions() }
        var chains: [String: [PriceBookVersion]] = [:]
        for version in versions { chains[version.name + "\u{1}" + (version.customerID ?? ""), default: []].append(version) }
        var body = ConsoleHTML.table(caption: "Price books", headers: ["Book", "Override for", "Versions", "Latest in force from"], numeric: [2],
                                     rows: chains.keys.sorted().map { key in
                                         let chain = chains[key]!
                                         return ["<a href=\"#\(ConsoleHTML.escape(ConsoleHTMLAnchor.of(key)))\">\(ConsoleHTML.escape(chain[0].name))</a>", ConsoleHTML.escape(chain[0].customerID ?? ""),
                                                 ConsoleHTML.figure("versions-\(chain[0].name)\(chain[0].customerID.map { "-" + $0 } ?? "")", shown: String(chain.count), exact: String(chain.count)),
                                                 ConsoleHTML.escape(chain.last!.effectiveFrom)]
                                     }, id: "price-books")
        for key in chains.keys.sorted() {
            let chain = chains[key]!.sorted { $0.version > $1.version }
            body += "<h2 id=\"\(ConsoleHTML.escape(ConsoleHTMLAnchor.of(key)))\">\(ConsoleHTML.escape(chain[0].name))\(chain[0].customerID.map { " (override for \(ConsoleHTML.escape($0)))" } ?? "")</h2>"
            for (index, version) in chain.enumerated() {
                var changes = "the first version"
                if index + 1 < chain.count, let old = try? PriceBookDocument.parse(chain[index + 1].document), let new = try? PriceBookDocument.parse(version.document) {
                    changes = "<ul>" + PriceBookDiff.lines(from: old, to: new).map { "<li>\(ConsoleHTML.escape($0))</li>" }.joined() + "</ul>"
                }
                body += """
                    <h3>Version \(version.version), in force from \(ConsoleHTML.escape(version.effectiveFrom)) (applied \(ConsoleHTML.escape(version.appliedAt)), \(ConsoleHTML.escape(version.currency)))</h3>
                    <p>Changes from the version before: \(changes)</p>
                    <details><summary>The document</summary><pre>\(ConsoleHTML.escape(version.document))</pre></details>
                    """
            }
        }
        return html(.ok, ConsoleHTML.page(title: "Price books", navigation: Self.operatorNavigation, current: "/console/price-books", body: body))
    }
}

/// Fragment ids for the price-book sections.
enum ConsoleHTMLAnchor {
    static func of(_ key: String) -> String {
        "book-" + key.unicodeScalars.map { $0.properties.isAlphabetic || ("0"..."9").contains($0) ? String($0) : "-" }.joined()
    }
}
