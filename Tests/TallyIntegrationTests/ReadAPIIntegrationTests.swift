import Foundation
import TallyCore
import XCTest

/// The read and management API of the real tally-ingest over what the real aggregator and rater
/// made of known events, its scopes, and schemathesis checking the running server against the
/// OpenAPI document. Expected figures are worked out by hand below, not read from Tally.
final class ReadAPIIntegrationTests: XCTestCase {
    var harness: AggregatorHarness!
    var processes: [ChildProcess] = []

    override func tearDown() {
        for process in processes { process.signal(SIGKILL); process.wait() }
        harness = nil
    }

    /// No minimum, so invoices carry usage and credits only.
    static let priceBook = """
        book: default
        effective_from: 2026-01-01T00:00:00Z
        currency: USD
        models:
          - { model: gpt-4o, input: "2.50", output: "10.00" }
          - { model: gpt-4o-mini, input: "0.15", output: "0.60" }
        """

    func json(_ response: HTTPResponse, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        XCTAssertEqual(response.status, 200, response.body, file: file, line: line)
        return try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any], response.body, file: file, line: line)
    }

    func data(_ object: [String: Any]) -> [[String: Any]] { object["data"] as? [[String: Any]] ?? [] }

    /// What `seed` made: tally-ingest (with the gateway on a fake upstream) over acme's and beta's known usage.
    struct Seeded {
        let base: String
        let admin: String
        let reader: String
        let usageKey: String
        /// The hour acme's three calls fall in.
        let hour: Int64
    }

    /// $10.00 of credit for acme, then three calls a minute apart in this hour:
    ///   e1 gpt-4o, chat:        1,000,000 in, 100,000 out: 2.50 + 1.00 = $3.50 (balance 6.50)
    ///   e2 gpt-4o, search:        200,000 in,  50,000 out: 0.50 + 0.50 = $1.00 (balance 5.50 < 6.00: a low-balance alert)
    ///   e3 gpt-4o-mini, chat:   1,000,000 in, 500,000 out: 0.15 + 0.30 = $0.45 (balance 5.05)
    /// web searches 2, 3 and 1 (teams search, support, search); a budget of 2,000,000 tokens a
    /// month alerting at 50 %: 1,100,000 at e1 (50 %), 2,850,000 at e3 (100 %). beta: one gpt-4o
    /// call of 1,000 in and 1,000 out ($0.0025 + $0.01 = $0.0125), no credit.
    func seed() async throws -> Seeded {
        harness = try AggregatorHarness()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("prices") + ".yaml")
        try Self.priceBook.write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        _ = try harness.tally(["pricing", "apply", file.path])
        _ = try harness.tally(["meters", "apply", TestStack.root.appendingPathComponent("examples/meters/agent-meters.yaml").path])
        _ = try harness.tally(["customers", "set", "acme", "--low-balance", "6.00"])

        let upstream = try ChildProcess(TestStack.root.appendingPathComponent("scripts/fake-llm-upstream").path, ["--port", "0", "--key", "sk-upstream"])
        processes.append(upstream)
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(10)) { upstream.log.contains("listening on") }, upstream.log)
        let upstreamURL = "http://127.0.0.1:" + upstream.log.split(separator: " ").last!.trimmingCharacters(in: .whitespacesAndNewlines)
        let (ingest, base, usageKey) = try harness.startIngest(extra: [
            "--openai-upstream", upstreamURL, "--anthropic-upstream", upstreamURL, "--rater-group", harness.group + "-rater",
        ])
        processes.append(ingest)
        let admin = "Bearer " + (try harness.createKey(["--scope", "admin"]))
        let reader = "Bearer " + (try harness.createKey(["--scope", "read"]))

        let granted = try http("POST", base + "/v1/wallets/acme/grants", body: #"{"id": "welcome", "amount": "10.00", "currency": "USD", "source": "promotion"}"#, authorization: admin)
        XCTAssertEqual(granted.status, 202, granted.body)
        let budget = try http("PUT", base + "/v1/customers/acme/budgets/tokens", body: #"{"period": "month", "measure": "tokens", "limit": "2000000", "alert_at": [50]}"#,
                              authorization: admin)
        XCTAssertEqual(budget.status, 202, budget.body)
        let hour = Granularity.hour.windowStart(Int64(Date().timeIntervalSince1970 * 1_000_000))
        let events = [
            UsageEvent(id: "e1", source: "app", subject: "acme", time: EventTime(microseconds: hour), model: "gpt-4o", feature: "chat",
                       inputTokens: 1_000_000, outputTokens: 100_000, properties: ["team": "search"], meters: ["web_search_requests": 2]),
            UsageEvent(id: "e2", source: "app", subject: "acme", time: EventTime(microseconds: hour + 60_000_000), model: "gpt-4o", feature: "search",
                       inputTokens: 200_000, outputTokens: 50_000, properties: ["team": "support"], meters: ["web_search_requests": 3]),
            UsageEvent(id: "e3", source: "app", subject: "acme", time: EventTime(microseconds: hour + 120_000_000), model: "gpt-4o-mini", feature: "chat",
                       inputTokens: 1_000_000, outputTokens: 500_000, properties: ["team": "search"], meters: ["web_search_requests": 1]),
            UsageEvent(id: "b1", source: "app", subject: "beta", time: EventTime(microseconds: hour), model: "gpt-4o", inputTokens: 1000, outputTokens: 1000),
        ]
        try await harness.publish(events)
        processes.append(try harness.startAggregator())
        let rater = try harness.startRater(["--group", harness.group + "-rater"])
        processes.append(rater)
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertTrue(try harness.waitUntilConsumed(group: harness.group + "-rater"), rater.log)
        return Seeded(base: base, admin: admin, reader: reader, usageKey: usageKey, hour: hour)
    }

    func testReadEndpointsScopesAndTheOpenAPIDocument() async throws {
        let seeded = try await seed()
        let (base, admin, reader, usageKey, hour) = (seeded.base, seeded.admin, seeded.reader, seeded.usageKey, seeded.hour)
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        func get(_ path: String, _ authorization: String) throws -> HTTPResponse { try http("GET", base + path, authorization: authorization) }

        // Usage by model in hours: gpt-4o 1,200,000 in and 150,000 out in 2 calls; gpt-4o-mini 1,000,000 and 500,000 in 1.
        let byModel = try json(try get("/v1/customers/acme/usage?granularity=hour&group_by=model", reader))
        let hourText = EventTime.format(microseconds: hour)
        XCTAssertEqual(byModel["granularity"] as? String, "hour")
        XCTAssertEqual(data(byModel).map { "\($0["window_start"]!) \($0["model"]!) \($0["input_tokens"]!) \($0["output_tokens"]!) \($0["total_tokens"]!) \($0["event_count"]!)" },
                       ["\(hourText) gpt-4o 1200000 150000 1350000 2", "\(hourText) gpt-4o-mini 1000000 500000 1500000 1"])
        // A day window is whole: asked from mid-day, it still holds all three calls (2,200,000 in).
        let day = try json(try get("/v1/customers/acme/usage?granularity=day&from=\(EventTime.format(microseconds: hour + 1_800_000_000))", reader))
        XCTAssertEqual(data(day).map { "\($0["window_start"]!) \($0["input_tokens"]!) \($0["event_count"]!)" },
                       ["\(EventTime.format(microseconds: Granularity.day.windowStart(now))) 2200000 3"])
        XCTAssertEqual(day["from"] as? String, EventTime.format(microseconds: Granularity.day.windowStart(hour)))
        // By feature and model (rows in the order model, feature…, whatever the order asked): chat has both models.
        let byFeature = try json(try get("/v1/customers/acme/usage?granularity=month&group_by=feature,model", reader))
        XCTAssertEqual(data(byFeature).map { "\($0["feature"]!)/\($0["model"]!) \($0["total_tokens"]!)" },
                       ["chat/gpt-4o 1100000", "search/gpt-4o 250000", "chat/gpt-4o-mini 1500000"])
        // A meter by its declared dimension: web searches 2 + 1 for search, 3 for support.
        let searches = try json(try get("/v1/customers/acme/usage?meter=web_search_requests&group_by=team", reader))
        XCTAssertEqual(data(searches).map { "\($0["team"]!) \($0["value"]!)" }, ["search 3", "support 3"])
        let badMeter = try get("/v1/customers/acme/usage?meter=web_search_requests&group_by=model", reader)
        XCTAssertEqual(badMeter.status, 400, badMeter.body)
        XCTAssertTrue(badMeter.body.contains(#""field":"group_by""#), badMeter.body)
        let badTime = try get("/v1/customers/acme/usage?from=yesterday", reader)
        XCTAssertTrue(badTime.status == 400 && badTime.body.contains(#""field":"from""#), badTime.body)

        // Balance: 10.00 − 3.50 − 1.00 − 0.45 = 5.05, all of it left on the grant.
        let balance = try json(try get("/v1/customers/acme/balance", reader))
        let wallet = try XCTUnwrap((balance["balances"] as? [[String: Any]])?.first)
        XCTAssertEqual(wallet["currency"] as? String, "USD")
        XCTAssertEqual(wallet["balance"] as? String, "5.05")
        XCTAssertEqual(wallet["grants_remaining"] as? String, "5.05")
        let grants = data(try json(try get("/v1/customers/acme/grants", reader)))
        XCTAssertEqual(grants.map { "\($0["grant_id"]!) \($0["amount"]!) \($0["remaining"]!)" }, ["welcome 10.00 5.05"])

        // The ledger newest first, two a page: e3, e2, then e1 and the grant.
        let first = try json(try get("/v1/customers/acme/ledger?limit=2", reader))
        XCTAssertEqual(data(first).map { "\($0["kind"]!) \($0["amount"]!) \($0["event_id"]!) \($0["grant_id"]!)" },
                       ["usage -0.45 e3 welcome", "usage -1.00 e2 welcome"])
        let cursor = try XCTUnwrap(first["next_cursor"] as? String)
        let second = try json(try get("/v1/customers/acme/ledger?limit=2&cursor=\(cursor)", reader))
        XCTAssertEqual(data(second).map { "\($0["kind"]!) \($0["amount"]!) \($0["event_id"]!)" }, ["usage -3.50 e1", "grant 10.00 welcome"])
        XCTAssertTrue(second["next_cursor"] is NSNull)
        // beta has no credit: its one call ($0.0125) is its day's overage entry, and no ledger entry.
        let overage = data(try json(try get("/v1/customers/beta/overage", reader)))
        XCTAssertEqual(overage.map { "\($0["day"]!) \($0["currency"]!) \($0["amount"]!) \($0["events"]!)" },
                       ["\(EventTime.format(microseconds: Granularity.day.windowStart(hour)).prefix(10)) USD -0.0125 1"])
        XCTAssertEqual(overage.first?["first_offset"] as? Int, overage.first?["last_offset"] as? Int, "one record charged")
        XCTAssertTrue(data(try json(try get("/v1/customers/beta/ledger", reader))).isEmpty)
        XCTAssertTrue(data(try json(try get("/v1/customers/acme/overage", reader))).isEmpty, "acme's credit covered all")
        let badCursor = try get("/v1/customers/acme/ledger?cursor=nonsense", reader)
        XCTAssertTrue(badCursor.status == 400 && badCursor.body.contains(#""field":"cursor""#), badCursor.body)
        // A cursor of the right shape holding a time past year 9999 is refused too, never read as page one.
        let farCursor = Data("\(Int64.max)\u{1f}welcome".utf8).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        let far = try get("/v1/customers/acme/grants?cursor=\(farCursor)", reader)
        XCTAssertTrue(far.status == 400 && far.body.contains(#""field":"cursor""#), far.body)
        // Times the database cannot hold are the client's to fix (400), not a retry (503).
        let yearZero = try get("/v1/customers/acme/usage?meter=web_search_requests&granularity=month&from=0001-01-01T00:00:00%2B01:00", reader)
        XCTAssertTrue(yearZero.status == 400 && yearZero.body.contains(#""field":"from""#), yearZero.body)
        let tooWide = try get("/v1/customers/acme/usage?granularity=hour&from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", reader)
        XCTAssertTrue(tooWide.status == 400 && tooWide.body.contains(#""field":"to""#), tooWide.body)

        // Alerts newest first: the limit at e3, the low balance at e2 (5.50 under 6.00), 50 % at e1.
        let alerts = data(try json(try get("/v1/customers/acme/alerts", reader)))
        XCTAssertEqual(alerts.map { "\($0["kind"]!) \($0["used"] ?? $0["balance"]!)" },
                       ["budget.limit_reached 2850000", "balance.low 5.50", "budget.threshold 1100000"])

        // The running total: usage lines of 3.00 + 1.50 + 0.15 + 0.30 = 4.95, paid from credit, 0.00 due.
        let current = try json(try get("/v1/customers/acme/invoices/current", reader))
        XCTAssertEqual(current["status"] as? String, "draft")
        let draft = try XCTUnwrap((current["invoices"] as? [[String: Any]])?.first)
        let lines = try XCTUnwrap(draft["lines"] as? [[String: Any]])
        XCTAssertEqual(lines.filter { $0["kind"] as? String == "usage" }.map { "\($0["model"]!) \($0["token_type"]!) \($0["quantity"]!) \($0["amount"]!)" }.sorted(),
                       ["gpt-4o input 1200000 3.00", "gpt-4o output 150000 1.50", "gpt-4o-mini input 1000000 0.15", "gpt-4o-mini output 500000 0.30"])
        XCTAssertEqual(draft["total_due"] as? String, "0.00")

        // Closed early, the same invoice is listed and shown, in JSON and HTML; the draft is then empty.
        let period = try XCTUnwrap(current["period"] as? String)
        _ = try harness.tally(["invoices", "close", "--period", period, "--customer", "acme", "--force"])
        let invoices = data(try json(try get("/v1/customers/acme/invoices", reader)))
        XCTAssertEqual(invoices.map { "\($0["period"]!) \($0["total_due"]!)" }, ["\(period) 0.00"])
        let invoiceID = try XCTUnwrap(invoices.first?["invoice_id"] as? String)
        let shown = try json(try get("/v1/customers/acme/invoices/\(invoiceID)", reader))
        XCTAssertEqual((shown["lines"] as? [[String: Any]])?.count, lines.count)
        let html = try http("GET", base + "/v1/customers/acme/invoices/\(invoiceID)", authorization: reader, headers: ["Accept": "text/html"])
        XCTAssertTrue(html.contentType.hasPrefix("text/html") && html.body.contains("<html"), html.body)
        XCTAssertEqual(try get("/v1/customers/acme/invoices/no-such", reader).status, 404)
        XCTAssertEqual((try json(try get("/v1/customers/acme/invoices/current", reader))["invoices"] as? [Any])?.count, 0)

        // Customers: acme with its settings, beta with the defaults; one a page.
        let customers = try json(try get("/v1/customers?limit=1", admin))
        XCTAssertEqual(data(customers).map { "\($0["customer"]!) \($0["configured"] as? Bool == true) \(($0["low_balance_thresholds"] as? [String]) ?? [])" },
                       [#"acme true ["6.00"]"#])
        let rest = try json(try get("/v1/customers?limit=1&cursor=\(try XCTUnwrap(customers["next_cursor"] as? String))", admin))
        XCTAssertEqual(data(rest).map { "\($0["customer"]!) \($0["configured"] as? Bool == true)" }, ["beta false"])

        // Settings (admin): the fields given change, the rest stay; bad fields are named; a reader may not.
        let patched = try http("PATCH", base + "/v1/customers/beta", body: #"{"subscription_fee": "49", "low_balance_thresholds": ["10", "2.5"]}"#, authorization: admin)
        XCTAssertEqual(patched.status, 200, patched.body)
        XCTAssertTrue(patched.body.contains(#""configured":true"#) && patched.body.contains(#""subscription_fee":"49.00""#)
                      && patched.body.contains(#""low_balance_thresholds":["10.00","2.50"]"#) && patched.body.contains(#""plan":"default""#), patched.body)
        XCTAssertTrue(try harness.tally(["customers", "show", "beta"]).contains("49.00"))
        let refused = try http("PATCH", base + "/v1/customers/beta", body: #"{"billing_anchor_day": 31, "owner": "x"}"#, authorization: admin)
        XCTAssertTrue(refused.status == 400 && refused.body.contains(#""field":"billing_anchor_day""#) && refused.body.contains(#""field":"owner""#), refused.body)
        XCTAssertEqual(try http("PATCH", base + "/v1/customers/beta", body: "{}", authorization: reader).status, 403)

        // Price books: the version, a dry run that stores nothing, then version 2 with its changes.
        let books = data(try json(try get("/v1/price-books", reader)))
        XCTAssertEqual(books.map { "\($0["book"]!) \($0["version"]!)" }, ["default 1"])
        let cheaper = Self.priceBook.replacingOccurrences(of: #"input: "2.50""#, with: #"input: "2.00""#)
        let dry = try http("POST", base + "/v1/price-books?dry_run=true", contentType: "application/yaml", body: cheaper, authorization: admin)
        XCTAssertEqual(dry.status, 200, dry.body)
        XCTAssertTrue(dry.body.contains(#""version":2"#) && dry.body.contains("gpt-4o input") && dry.body.contains(#""created":false"#), dry.body)
        XCTAssertEqual(data(try json(try get("/v1/price-books", reader))).count, 1)
        let applied = try http("POST", base + "/v1/price-books", contentType: "application/yaml", body: cheaper, authorization: admin)
        XCTAssertEqual(applied.status, 201, applied.body)
        let version2 = try json(try get("/v1/price-books/default/versions/2", reader))
        XCTAssertEqual((version2["changes_from_previous"] as? [String])?.count, 1, "\(version2)")
        XCTAssertEqual(try get("/v1/price-books/default/versions/3", reader).status, 404)

        // Consumers (admin): the rater's positions at the log end, no lag.
        XCTAssertEqual(try get("/v1/consumers?include_replays=perhaps", admin).status, 400)
        let consumers = data(try json(try get("/v1/consumers", admin))).filter { $0["group"] as? String == harness.group + "-rater" }
        XCTAssertFalse(consumers.isEmpty)
        XCTAssertTrue(consumers.allSatisfy { $0["lag"] as? Int == 0 }, "\(consumers)")

        // Scopes. A usage key reads nothing; a reader is no admin; a portal token reads its customer only.
        XCTAssertEqual(try get("/v1/customers/acme/usage", "Bearer " + usageKey).status, 403)
        XCTAssertEqual(try get("/v1/customers", reader).status, 200)
        XCTAssertEqual(try http("POST", base + "/v1/price-books", contentType: "application/yaml", body: cheaper, authorization: reader).status, 403)
        XCTAssertEqual(try http("POST", base + "/v1/customers/acme/portal-tokens", body: "{}", authorization: reader).status, 403)
        let issued = try http("POST", base + "/v1/customers/acme/portal-tokens", body: #"{"expires_in_hours": 2}"#, authorization: admin)
        XCTAssertEqual(issued.status, 201, issued.body)
        let portal = "Bearer " + (try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(issued.body.utf8)) as? [String: Any])?["token"] as? String))
        XCTAssertEqual(try get("/v1/customers/acme/balance", portal).status, 200)
        XCTAssertEqual(try get("/v1/customers/beta/balance", portal).status, 403)
        XCTAssertEqual(try get("/v1/price-books", portal).status, 403)
        XCTAssertEqual(try get("/v1/consumers", portal).status, 403)
        let send = try http("POST", base + "/v1/events", body: "{}", authorization: portal)
        XCTAssertTrue(send.status == 403 && send.body.contains("ingest"), send.body)
        // A lapsed portal token is refused like a revoked key.
        let lapsing = try harness.createKey(["--scope", "read", "--customer", "acme", "--expires-in-hours", "1"])
        let lapsingID = String(lapsing.split(separator: "_")[1])
        XCTAssertEqual(try harness.connection.query("UPDATE tally.api_keys SET expires_at = now() - interval '1 second' WHERE key_id = $1", [lapsingID]).affectedRows, 1)
        XCTAssertEqual(try get("/v1/customers/acme/balance", "Bearer " + lapsing).status, 401)

        // The document is served, and schemathesis finds the running server true to it on every
        // route: no 5xx, documented statuses and content types, bodies matching their schemas.
        let document = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(try get("/openapi.json", "").body.utf8)) as? [String: Any])
        XCTAssertEqual(document["openapi"] as? String, "3.1.0")
        let operations = ((document["paths"] as? [String: [String: Any]]) ?? [:]).values.reduce(0) { $0 + $1.keys.filter { ["get", "post", "put", "delete"].contains($0) }.count }
        XCTAssertGreaterThan(operations, 35)
        let tools = try XCTUnwrap(ProcessInfo.processInfo.environment["TALLY_API_TOOLS"], "run under scripts/test (eval \"$(scripts/stack env)\")")
        let (status, output) = try ChildProcess.run("/usr/bin/env", [
            "PYTHONPATH=\(tools)", "python3", tools + "/bin/schemathesis", "run", base + "/openapi.json", "--url", base,
            "-H", "Authorization: \(admin)", "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples", "25", "--seed", "1", "--no-color",
        ])
        XCTAssertEqual(status, 0, String(output.suffix(6000)))
        // Every operation tested (schemathesis leaves out the document's own route).
        let selected = try XCTUnwrap(output.range(of: #"Selected: (\d+)/"#, options: .regularExpression).map { Int(output[$0].dropFirst(10).dropLast()) ?? 0 })
        XCTAssertGreaterThanOrEqual(selected, operations - 1, String(output.suffix(3000)))
        XCTAssertTrue(output.contains("Tested: \(selected)\n"), "every operation tested: \(String(output.suffix(3000)))")
    }

    /// Headless Chromium (Debian's) loads each console page and the portal against the seeded
    /// database; every figure a page shows equals the API's (or the hand-worked one where the API
    /// has none), and each page is saved as a screenshot (TALLY_SCREENSHOT_DIR, or .tally/screenshots).
    func testTheConsoleShowsWhatTheAPIAnswers() async throws {
        let seeded = try await seed()
        let base = seeded.base
        func api(_ path: String, _ authorization: String) throws -> [String: Any] {
            let response = try http("GET", base + path, authorization: authorization)
            XCTAssertEqual(response.status, 200, response.body)
            return try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any])
        }
        func total(_ usage: [String: Any], _ field: String = "total_tokens") -> String {
            String((usage["data"] as? [[String: Any]] ?? []).reduce(0) { $0 + (($1[field] as? Int) ?? 0) })
        }
        let directory = ProcessInfo.processInfo.environment["TALLY_SCREENSHOT_DIR"] ?? TestStack.root.appendingPathComponent(".tally/screenshots").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let adminToken = String(seeded.admin.dropFirst("Bearer ".count))

        /// The page's DOM after load, and a screenshot of it; the token goes in the URL once
        /// (the page moves it into its cookie and redirects).
        func load(_ path: String, token: String, screenshot: String) throws -> [String: String] {
            let url = base + path + (path.contains("?") ? "&" : "?") + "token=" + token
            let chromium = ["/usr/bin/env", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1366,1100"]
            let (status, dom) = try ChildProcess.run(chromium[0], Array(chromium.dropFirst()) + ["--dump-dom", url])
            XCTAssertEqual(status, 0, dom)
            let file = directory + "/" + screenshot + ".png"
            try? FileManager.default.removeItem(atPath: file)
            _ = try ChildProcess.run(chromium[0], Array(chromium.dropFirst()) + ["--screenshot=" + file, url])
            let size = (try FileManager.default.attributesOfItem(atPath: file)[.size] as? Int) ?? 0
            XCTAssertGreaterThan(size, 10_000, "\(file) is no screenshot")
            // data-figure="name" data-value="exact"
            let pattern = try NSRegularExpression(pattern: #"data-figure="([^"]+)" data-value="([^"]*)""#)
            var figures: [String: String] = [:]
            for match in pattern.matches(in: dom, range: NSRange(dom.startIndex..., in: dom)) {
                figures[String(dom[Range(match.range(at: 1), in: dom)!])] = String(dom[Range(match.range(at: 2), in: dom)!])
            }
            XCTAssertFalse(figures.isEmpty, String(dom.prefix(2000)))
            return figures
        }

        // The overview: this month's tokens and calls are acme's and beta's together; revenue
        // $4.95 + $0.0125 (no API sums every customer, so it is the hand-worked figure).
        let overview = try load("/console", token: adminToken, screenshot: "console-overview")
        let acmeMonth = try api("/v1/customers/acme/usage?granularity=month", seeded.reader)
        let betaMonth = try api("/v1/customers/beta/usage?granularity=month", seeded.reader)
        XCTAssertEqual(overview["tokens-month"], String(Int(total(acmeMonth))! + Int(total(betaMonth))!))
        XCTAssertEqual(overview["calls-month"], String(Int(total(acmeMonth, "event_count"))! + Int(total(betaMonth, "event_count"))!))
        XCTAssertEqual(overview["revenue-month-USD"], "4.9625")
        XCTAssertEqual(overview["customers-active"], "2")
        XCTAssertEqual(overview["dead-letters"], "0")

        // A customer's page: balance, credit left, tokens, per model, the meter.
        let page = try load("/console/customers/acme", token: adminToken, screenshot: "console-customer")
        let balance = try XCTUnwrap((try api("/v1/customers/acme/balance", seeded.reader)["balances"] as? [[String: Any]])?.first)
        XCTAssertEqual(page["balance-USD"], balance["balance"] as? String)
        XCTAssertEqual(page["grants-remaining-USD"], balance["grants_remaining"] as? String)
        XCTAssertEqual(page["tokens-month"], total(acmeMonth))
        for row in (try api("/v1/customers/acme/usage?granularity=month&group_by=model", seeded.reader)["data"] as? [[String: Any]]) ?? [] {
            let model = try XCTUnwrap(row["model"] as? String)
            XCTAssertEqual(page["usage-model-\(model)"], (row["total_tokens"] as? Int).map(String.init), model)
        }
        let searches = (try api("/v1/customers/acme/usage?granularity=month&meter=web_search_requests", seeded.reader)["data"] as? [[String: Any]])?.first
        XCTAssertEqual(page["meter-web_search_requests"], (searches?["value"] as? Int).map(String.init))
        XCTAssertEqual(page["meter-web_search_requests"], "6")

        // Price books: the versions the API lists.
        let books = try load("/console/price-books", token: adminToken, screenshot: "console-price-books")
        XCTAssertEqual(books["versions-default"], String((try api("/v1/price-books", seeded.reader)["data"] as? [Any])?.count ?? -1))

        // The portal, with a portal token: the customer's own figures; the operator pages send it home.
        let issued = try http("POST", base + "/v1/customers/acme/portal-tokens", body: "{}", authorization: seeded.admin)
        let token = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(issued.body.utf8)) as? [String: Any])?["token"] as? String)
        let portal = try load("/portal", token: token, screenshot: "portal")
        XCTAssertEqual(portal["balance-USD"], balance["balance"] as? String)
        XCTAssertEqual(portal["tokens-month"], total(acmeMonth))
        let draft = try api("/v1/customers/acme/invoices/current", "Bearer " + token)
        XCTAssertEqual(portal["running-total-USD"].map { Money.nanos($0) }, ((draft["invoices"] as? [[String: Any]])?.first?["total_due"] as? String).map { Money.nanos($0) })
        let (_, sent) = try ChildProcess.run("/usr/bin/env", ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", base + "/console/customers/beta?token=" + token])
        XCTAssertTrue(sent.contains("Your usage") && !sent.contains("beta"), String(sent.prefix(3000)))

        // Redirects stay on this server: sign-in's `next` only names console and portal pages, and
        // a token cleaned from `//console` does not become a link to the host "console".
        let signIn = try Self.unfollowed("POST", base + "/console/login", body: "token=\(adminToken)&next=%2F%5Cevil.example",
                                         headers: ["Content-Type": "application/x-www-form-urlencoded"])
        XCTAssertEqual(signIn.status, 303)
        XCTAssertEqual(signIn.location, "/console")
        XCTAssertTrue(signIn.cookie.contains("HttpOnly") && signIn.cookie.contains("SameSite=Lax"), signIn.cookie)
        XCTAssertEqual(try Self.unfollowed("POST", base + "/console/login", body: "token=\(adminToken)&next=%2Fportal",
                                           headers: ["Content-Type": "application/x-www-form-urlencoded"]).location, "/portal")
        let crossSite = try Self.unfollowed("POST", base + "/console/login", body: "token=\(adminToken)",
                                            headers: ["Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "cross-site"])
        XCTAssertEqual(crossSite.status, 403)
        let doubled = try Self.unfollowed("GET", base + "//console?token=\(adminToken)")
        XCTAssertEqual(doubled.status, 303)
        XCTAssertEqual(doubled.location, "/console")
    }

    /// One request whose redirect is not followed: the status, Location and Set-Cookie.
    static func unfollowed(_ method: String, _ url: String, body: String? = nil, headers: [String: String] = [:]) throws -> (status: Int, location: String, cookie: String) {
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", """
            import http.client, json, sys, urllib.parse
            method, url, body, headers = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
            parts = urllib.parse.urlsplit(url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            # The path as given, leading slashes and all.
            connection.request(method, url[len(parts.scheme) + 3 + len(parts.netloc):], body=body or None, headers=headers)
            response = connection.getresponse()
            print(response.status); print(response.getheader("Location") or ""); print(response.getheader("Set-Cookie") or "")
            """, method, url, body ?? "", String(decoding: try JSONSerialization.data(withJSONObject: headers), as: UTF8.self)])
        let lines = output.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard status == 0, lines.count >= 3, let code = Int(lines[0]) else { throw NSError(domain: "http", code: Int(status), userInfo: [NSLocalizedDescriptionKey: output]) }
        return (code, lines[1], lines[2])
    }
}
