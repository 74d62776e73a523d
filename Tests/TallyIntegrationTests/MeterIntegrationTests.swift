import Foundation
import TallyCore
import TallyPostgres
import XCTest

/// Meters end to end: the catalog applied with the real CLI, events with meters through the real
/// broker, the real aggregator, PostgreSQL's windows compared with a recount made here.
final class MeterIntegrationTests: XCTestCase {
    static let catalog = """
        meters:
          - { name: web_search_requests, unit: request, aggregation: sum, dimensions: [team] }
          - { name: tool_calls, unit: call, aggregation: count }
          - { name: context_peak, unit: token, aggregation: max, dimensions: [model] }
          - { name: seats, unit: seat, aggregation: latest }
          - { name: active_end_users, unit: user, aggregation: unique_count, property: end_user, dimensions: [team] }
        """
    /// Version 2 declares a meter the stream carried all along.
    static let catalogV2 = catalog + "\n  - { name: vector_searches, unit: search, aggregation: sum, dimensions: [feature] }\n"

    static func write(_ text: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("meters") + ".yaml").path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// Events of three customers over the turn of a month, a fifth of them meter-only, each at
    /// its own second; published in a shuffled order so that log order is not time order.
    static func stream() -> [UsageEvent] {
        var random = SeededGenerator(seed: 24)
        let start = EventTime("2026-01-30T12:00:00Z")!.microseconds
        var events: [UsageEvent] = []
        for index in 0..<3_000 {
            let customer = "meter-cust-\(index % 3)"
            let time = EventTime(microseconds: start + Int64(index) * 61_000_000)
            var properties: [String: String] = [:]
            let team = ["search", "chat", nil][Int(random.next() % 3)]
            if let team { properties["team"] = team }
            if random.next() % 10 != 0 { properties["end_user"] = "user-\(random.next() % 40)" }
            var meters: [String: Int64] = ["active_end_users": 1, "seats": Int64(1 + random.next() % 50)]
            if random.next() % 2 == 0 { meters["web_search_requests"] = Int64(random.next() % 6) }
            if random.next() % 3 == 0 { meters["tool_calls"] = Int64(random.next() % 4) }
            if index % 5 == 0 {
                // A retrieval step of an agent: no model call.
                meters["vector_searches"] = Int64(1 + random.next() % 3)
                if index % 100 == 0 { meters["mystery_units"] = 7 }
                events.append(UsageEvent(id: "m-\(index)", source: "app://agent", subject: customer, time: time, model: "", feature: "retrieval",
                                         inputTokens: 0, outputTokens: 0, properties: properties, meters: meters))
            } else {
                let model = ["gpt-4o", "claude-sonnet-4-5"][Int(random.next() % 2)]
                meters["context_peak"] = Int64(random.next() % 200_000)
                events.append(UsageEvent(id: "m-\(index)", source: "app://agent", subject: customer, time: time, model: model,
                                         inputTokens: Int64(random.next() % 1000), outputTokens: Int64(random.next() % 500),
                                         properties: properties, meters: meters))
            }
        }
        for index in stride(from: events.count - 1, to: 0, by: -1) { events.swapAt(index, Int(random.next() % UInt64(index + 1))) }
        return events
    }

    /// The windows `tally.meter_windows` must hold, recounted from the events in log order:
    /// "granularity|customer|meter|start|dimensions" to the figure. Window starts come from the
    /// events' RFC 3339 text (an hour is its first 13 characters), not from Tally's arithmetic.
    static func recount(_ events: [UsageEvent], declared: [String: (aggregation: String, dimension: String?)]) -> [String: String] {
        var sums: [String: Int64] = [:]
        var maxima: [String: Int64] = [:]
        var latest: [String: (time: Int64, quantity: Int64)] = [:]
        var distinct: [String: Set<String>] = [:]
        var kinds: [String: String] = [:]
        for event in events {
            let text = event.time.text
            let starts = ["hour": String(text.prefix(13)) + ":00:00Z", "day": String(text.prefix(10)) + "T00:00:00Z",
                          "month": String(text.prefix(7)) + "-01T00:00:00Z"]
            var labels = event.properties
            if event.isModelCall { labels["model"] = event.model }
            if let feature = event.feature { labels["feature"] = feature }
            for (meter, quantity) in event.meters {
                guard let (aggregation, dimension) = declared[meter] else { continue }
                // jsonb's text form of the dimensions column.
                let dimensions = dimension.map { "{\"\($0)\": \"\(labels[$0] ?? "")\"}" } ?? "{}"
                for (granularity, start) in starts {
                    let key = "\(granularity)|\(event.subject)|\(meter)|\(start)|\(dimensions)"
                    switch aggregation {
                    case "sum": sums[key, default: 0] += quantity
                    case "count": sums[key, default: 0] += 1
                    case "max": maxima[key] = max(maxima[key] ?? 0, quantity)
                    case "latest": if (latest[key]?.time ?? .min) < event.time.microseconds { latest[key] = (event.time.microseconds, quantity) }
                    default:
                        // A reading without the property adds no value, and no window.
                        guard let user = event.properties["end_user"] else { continue }
                        distinct[key, default: []].insert(user)
                    }
                    kinds[key] = aggregation
                }
            }
        }
        var expected: [String: String] = [:]
        for (key, kind) in kinds {
            switch kind {
            case "sum", "count": expected[key] = String(sums[key]!)
            case "max": expected[key] = String(maxima[key]!)
            case "latest": expected[key] = String(latest[key]!.quantity)
            default: expected[key] = String(distinct[key]!.count)
            }
        }
        return expected
    }

    static func storedWindows(_ harness: AggregatorHarness) throws -> [String: String] {
        let result = try harness.connection.query("""
            SELECT granularity || '|' || customer_id || '|' || meter || '|' || to_char(window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                   || '|' || dimensions::text, value::text
            FROM tally.meter_windows
            """)
        var windows: [String: String] = [:]
        for row in result.rows { windows[row[0]!] = row[1]! }
        return windows
    }

    /// Every aggregation at hour, day and month over the turn of a month, with duplicates, small
    /// batches and a meter declared halfway: equal to the recount; replay rebuilds the same state.
    func testMeterWindowsAreExactAtEveryGranularityAndAReplayRebuildsThem() async throws {
        let harness = try AggregatorHarness()
        XCTAssertTrue(try harness.tally(["meters", "apply", try Self.write(Self.catalog)]).contains("applied meter catalog version 1: 5 meters"))
        let events = Self.stream()
        var records: [(key: String, value: [UInt8])] = []
        for (index, event) in events.enumerated() {
            records.append((event.subject, EventEncoder.encode(event)))
            // Sent twice: counted once.
            if index % 11 == 0 { records.append((event.subject, EventEncoder.encode(event))) }
        }
        let half = records.count / 2
        try await harness.publish(Array(records[..<half]))
        let aggregator = try harness.startAggregator(["--batch-size", "97"])
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)

        // vector_searches is not declared yet: its readings wait aside, none lost.
        let waiting = try harness.connection.query("SELECT count(*) FROM tally.meter_undeclared_readings WHERE meter = 'vector_searches'").scalar
        let firstHalfEvents = Set(records[..<half].map { String(decoding: $0.value, as: UTF8.self) })
        let expectedWaiting = events.filter { $0.meters["vector_searches"] != nil && firstHalfEvents.contains(String(decoding: EventEncoder.encode($0), as: UTF8.self)) }.count
        XCTAssertEqual(waiting, String(expectedWaiting))
        let applied = try harness.tally(["meters", "apply", try Self.write(Self.catalogV2)])
        XCTAssertTrue(applied.contains("applied meter catalog version 2: 6 meters; \(expectedWaiting) readings"), applied)

        try await harness.publish(Array(records[half...]))
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)

        let declared: [String: (aggregation: String, dimension: String?)] = [
            "web_search_requests": ("sum", "team"), "tool_calls": ("count", nil), "context_peak": ("max", "model"), "seats": ("latest", nil),
            "active_end_users": ("unique_count", "team"), "vector_searches": ("sum", "feature"),
        ]
        let expected = Self.recount(events, declared: declared)
        let stored = try Self.storedWindows(harness)
        XCTAssertEqual(stored.count, expected.count)
        for (key, value) in expected.sorted(by: { $0.key < $1.key }) where stored[key] != value {
            XCTFail("\(key): stored \(stored[key] ?? "nothing"), recounted \(value)")
        }
        // A meter never declared keeps its readings, one per counted event.
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.meter_undeclared_readings").scalar,
                       String(events.filter { $0.meters["mystery_units"] != nil }.count))

        let status = try harness.tally(["status", "--topic", harness.topic])
        XCTAssertTrue(status.contains("readings of undeclared meters") && status.contains("mystery_units"), status)

        // End users per customer and month with the team dimension collapsed: the union's size.
        let users = try harness.tally(["usage", "--meter", "active_end_users", "--granularity", "month", "--customer", "meter-cust-1", "--format", "csv"])
        var union: [String: Set<String>] = [:]
        for event in events where event.subject == "meter-cust-1" {
            if let user = event.properties["end_user"] { union[String(event.time.text.prefix(7)), default: []].insert(user) }
        }
        XCTAssertEqual(users, "window_start,customer,active_end_users\n"
                       + union.keys.sorted().map { "\($0)-01T00:00:00Z,meter-cust-1,\(union[$0]!.count)\n" }.joined(), users)
        let byTeam = try harness.tally(["usage", "--meter", "web_search_requests", "--granularity", "day", "--group-by", "team", "--format", "csv"])
        XCTAssertEqual(byTeam.split(separator: "\n").first, "window_start,customer,team,web_search_requests")
        let refused = try harness.tallyStatus(["usage", "--meter", "web_search_requests", "--group-by", "region"])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.output.contains("region is not a dimension of meter web_search_requests: it declares team"), refused.output)

        // Rebuilt from offset zero with catalog version 2 from the start: the same windows.
        let replay = try harness.tallyStatus(["replay", "--topic", harness.topic, "--live-group", harness.group, "--consumer", "aggregator", "--dry-run"])
        XCTAssertEqual(replay.status, 0, replay.output)
        XCTAssertTrue(replay.output.contains("identical: the replay rebuilt the live state exactly"), replay.output)
        // The idle aggregator folds its deltas: the rows changed below are folded ones.
        XCTAssertTrue(try TestStack.eventually {
            try harness.connection.query("SELECT (SELECT count(*) FROM tally.meter_window_deltas) + (SELECT count(*) FROM tally.meter_unique_value_deltas)").scalar == "0"
        })
        // Reconcile recounts every meter window from the topic: clean, until rows are changed by hand.
        let groups = ["--topic", harness.topic, "--aggregator-group", harness.group, "--rater-group", harness.group + "-no-rater"]
        let clean = try harness.tallyStatus(["reconcile"] + groups)
        XCTAssertEqual(clean.status, 0, clean.output)
        XCTAssertTrue(clean.output.contains(", 0 mismatches"), clean.output)
        try harness.connection.query("""
            UPDATE tally.meter_windows_hourly SET value = value + 1
            WHERE ctid = (SELECT ctid FROM tally.meter_windows_hourly WHERE meter = 'seats' ORDER BY customer_id, window_start LIMIT 1)
            """)
        try harness.connection.query("""
            DELETE FROM tally.meter_unique_values_hourly
            WHERE ctid = (SELECT ctid FROM tally.meter_unique_values_hourly ORDER BY customer_id, window_start, value LIMIT 1)
            """)
        try harness.connection.query("DELETE FROM tally.meter_undeclared_readings WHERE ctid = (SELECT ctid FROM tally.meter_undeclared_readings LIMIT 1)")
        let broken = try harness.tallyStatus(["reconcile"] + groups)
        XCTAssertEqual(broken.status, 1, broken.output)
        XCTAssertTrue(broken.output.contains("meter_windows_hourly") && broken.output.contains(" seats "), broken.output)
        XCTAssertTrue(broken.output.contains(" active_end_users "), broken.output)
        XCTAssertTrue(broken.output.contains("meter_undeclared_readings"), broken.output)
        XCTAssertTrue(broken.output.contains(", 3 mismatches"), broken.output)

        let checksum = try harness.tally(["checksum", "--consumer", "aggregator", "--group", harness.group])
        XCTAssertTrue(checksum.contains("meter_unique_values_hourly") && checksum.contains("meter_undeclared_readings"), checksum)
    }

    /// A standalone meter event (an agent's vector search) and a model call's web searches are
    /// priced by the book's meter prices, invoiced on lines that name the meter and the book, and
    /// a replay of the rater rebuilds the same charges.
    func testMetersArePricedAndInvoiced() async throws {
        let harness = try AggregatorHarness()
        try harness.tally(["meters", "apply", try Self.write("""
            meters:
              - { name: vector_searches, unit: search, aggregation: sum }
              - { name: web_search_requests, unit: search, aggregation: sum }
              - { name: active_end_users, unit: user, aggregation: unique_count, property: end_user }
            """)])
        let book = """
            book: default
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            models:
              - { model: gpt-4o, input: "2.50", output: "10.00" }
            meters:
              - { meter: vector_searches, price: "0.002" }
              - { meter: web_search_requests, price: { package: { size: 1000, price: "10.00" } } }
            """
        let refused = try harness.tallyStatus(["pricing", "apply", try Self.write(book + "\n  - { meter: active_end_users, price: \"1\" }\n")])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.output.contains("active_end_users is a unique_count meter; only sum and count meters are priced"), refused.output)
        XCTAssertTrue(try harness.tally(["pricing", "apply", try Self.write(book)]).contains("1 models and 2 meters"))
        let time = EventTime("2026-10-05T10:00:00Z")!
        func event(_ id: String, model: String = "", input: Int64 = 0, output: Int64 = 0, meters: [String: Int64]) -> UsageEvent {
            UsageEvent(id: id, source: "app://agent", subject: "vs-cust", time: time, model: model, inputTokens: input, outputTokens: output, meters: meters)
        }
        try await harness.publish([event("s1", meters: ["vector_searches": 2]), event("s2", meters: ["vector_searches": 5]),
                                   event("s3", meters: ["vector_searches": 1_000]),
                                   event("c1", model: "gpt-4o", input: 1_000, output: 100, meters: ["web_search_requests": 3])])
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertTrue(try harness.tally(["invoices", "close", "--period", "2026-10"]).contains("closed 1 invoices"))
        let lines = try harness.connection.query("""
            SELECT description, quantity::text, exact_amount_nanos::text, book_name || ' v' || book_version FROM tally.invoice_lines
            WHERE invoice_id = 'INV-2026-10-vs-cust-USD' AND token_type = 'meter' ORDER BY line_no
            """).rows.map { $0.map { $0 ?? "" } }
        // 1,007 searches at 0.002; 3 web searches are one started block of 1,000 at 10.00.
        XCTAssertEqual(lines, [["vector_searches (meter)", "1007", "2014000000", "default v1"],
                               ["web_search_requests (meter)", "3", "10000000000", "default v1"]])
        // With the call's tokens (0.0025 + 0.001), 12.0175 rounds to 12.02.
        XCTAssertEqual(try harness.connection.query("SELECT total_due_nanos FROM tally.invoices WHERE invoice_id = 'INV-2026-10-vs-cust-USD'").scalar,
                       "12020000000")
        let replay = try harness.tallyStatus(["replay", "--topic", harness.topic, "--live-group", harness.group, "--consumer", "rater", "--dry-run"])
        XCTAssertEqual(replay.status, 0, replay.output)
        XCTAssertTrue(replay.output.contains("identical: the replay rebuilt the live state exactly"), replay.output)
        // A new version's meter prices show in the diff.
        try harness.tally(["pricing", "apply", try Self.write(book.replacingOccurrences(of: #"price: "0.002""#, with: #"price: "0.0015""#))])
        XCTAssertEqual(try harness.tally(["pricing", "diff", "default", "--from", "1"]), "~ meter vector_searches: 0.002 USD / unit → 0.0015 USD / unit\n")
    }

    /// A catalog version may add meters but never drop one or change its aggregation.
    func testACatalogVersionThatChangesADeclaredMeterIsRefused() throws {
        let harness = try AggregatorHarness()
        try harness.tally(["meters", "apply", try Self.write(Self.catalog)])
        XCTAssertTrue(try harness.tally(["meters", "apply", try Self.write(Self.catalog)]).contains("identical; nothing stored"))
        let changed = try harness.tallyStatus(["meters", "apply", try Self.write(Self.catalog.replacingOccurrences(of: "aggregation: max", with: "aggregation: sum"))])
        XCTAssertNotEqual(changed.status, 0)
        XCTAssertTrue(changed.output.contains("meter context_peak changes its aggregation or dimensions"), changed.output)
        let bad = try harness.tallyStatus(["meters", "apply", try Self.write("meters:\n  - { name: Bad, unit: x, aggregation: sum }\n")])
        XCTAssertTrue(bad.output.contains("meters[0].name") && bad.output.contains("line 2"), bad.output)
        let listed = try harness.tally(["meters", "list", "--format", "csv"])
        XCTAssertTrue(listed.contains("active_end_users,user,unique_count,end_user,team,1"), listed)
    }

    /// Anthropic's usage object reports its server tools: /v1/usage/anthropic turns them into the
    /// standard meters, with the call's status and attempt, and they land in meter windows.
    func testProviderUsageObjectsFillTheStandardMeters() throws {
        let harness = try AggregatorHarness()
        try harness.tally(["meters", "apply", try Self.write("""
            meters:
              - { name: web_search_requests, unit: search, aggregation: sum, dimensions: [status] }
              - { name: web_fetch_requests, unit: fetch, aggregation: sum }
            """)])
        let (ingest, base, key) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let now = EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000)).text
        func post(_ id: String, _ extra: String, searches: Int, fetches: Int) throws -> HTTPResponse {
            try http("POST", base + "/v1/usage/anthropic", body: """
                {"id": "\(id)", "customer": "acme", "model": "claude-sonnet-4-5", "time": "\(now)"\(extra),
                 "usage": {"input_tokens": 10, "output_tokens": 5, "server_tool_use": {"web_search_requests": \(searches), "web_fetch_requests": \(fetches)}}}
                """, authorization: "Bearer \(key)")
        }
        XCTAssertEqual(try post("u1", "", searches: 3, fetches: 1).status / 100, 2)
        XCTAssertEqual(try post("u2", #", "status": "error", "attempt": 2"#, searches: 2, fetches: 0).status / 100, 2)
        let wrong = try post("u3", #", "status": "maybe""#, searches: 1, fetches: 0)
        XCTAssertEqual(wrong.status, 400)
        XCTAssertTrue(wrong.body.contains(#""field":"status""#), wrong.body)
        let negative = try post("u4", "", searches: -1, fetches: 0)
        XCTAssertTrue(negative.body.contains("usage.server_tool_use.web_search_requests"), negative.body)
        let aggregator = try harness.startAggregator()
        // Ingest wrote the records, so the harness knows no log end: wait for the two events' keys.
        XCTAssertTrue(try TestStack.eventually { try harness.connection.query("SELECT count(*) FROM tally.usage_event_keys").scalar == "2" }, aggregator.log)
        let searches = try harness.tally(["usage", "--meter", "web_search_requests", "--granularity", "day", "--group-by", "status", "--format", "csv"])
        XCTAssertEqual(searches.split(separator: "\n").dropFirst().map { $0.split(separator: ",").dropFirst().joined(separator: ",") },
                       ["acme,error,2", "acme,success,3"])
        XCTAssertTrue(try harness.tally(["usage", "--meter", "web_fetch_requests", "--format", "csv"]).hasSuffix(",acme,1\n"))
        // The token windows split by status too: what the failed call used (10 input and 5 output tokens each).
        let tokens = try harness.tally(["usage", "--granularity", "day", "--group-by", "status", "--format", "csv"])
        XCTAssertEqual(tokens.split(separator: "\n").dropFirst().map { $0.split(separator: ",").dropFirst().joined(separator: ",") },
                       ["acme,error,10,5,0,0,0,15,1", "acme,success,10,5,0,0,0,15,1"], tokens)
    }

    /// The ingest API refuses a meter the catalog does not declare, naming the field; declared
    /// meters and meter-only events are accepted.
    func testTheIngestAPIRefusesUndeclaredMeters() throws {
        let harness = try AggregatorHarness()
        try harness.tally(["meters", "apply", try Self.write(Self.catalog)])
        let (ingest, base, key) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let now = EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000))
        func body(_ id: String, _ meters: [String: Int64], model: String = "gpt-4o") -> String {
            String(decoding: EventEncoder.encode(UsageEvent(id: id, source: "test", subject: "acme", time: now, model: model,
                                                            inputTokens: model.isEmpty ? 0 : 5, outputTokens: model.isEmpty ? 0 : 1, meters: meters)), as: UTF8.self)
        }
        let refused = try http("POST", base + "/v1/events", body: body("a", ["web_search_requests": 1, "not_declared": 2]), authorization: "Bearer \(key)")
        XCTAssertEqual(refused.status, 400, refused.body)
        XCTAssertTrue(refused.body.contains(#""field":"data.meters.not_declared""#), refused.body)
        XCTAssertTrue(refused.body.contains("is not a declared meter"), refused.body)
        let accepted = try http("POST", base + "/v1/events", body: body("b", ["web_search_requests": 1]), authorization: "Bearer \(key)")
        XCTAssertEqual(accepted.status / 100, 2, accepted.body)
        let meterOnly = try http("POST", base + "/v1/events", body: body("c", ["seats": 4], model: ""), authorization: "Bearer \(key)")
        XCTAssertEqual(meterOnly.status / 100, 2, meterOnly.body)
    }
}
