import Foundation
import TallyCore
import XCTest

/// Budgets end to end: declared through tally-ingest's API, counted by the real rater from the
/// log, alerted once per crossing (also as webhook messages), listed by the CLI, and rebuilt
/// exactly by a replay from offset zero.
final class BudgetIntegrationTests: XCTestCase {
    /// One gpt-4o call of 600 input and 400 output tokens: 1,000 tokens, and at $2.50 and $10.00
    /// per million, 0.0015 + 0.004 = $0.0055.
    static func call(_ id: String, customer: String = "acme", team: String, user: String, at time: EventTime) -> UsageEvent {
        UsageEvent(id: id, source: "app", subject: customer, time: time, model: "gpt-4o", inputTokens: 600, outputTokens: 400,
                   properties: ["team": team, "end_user": user])
    }

    func testTeamAndEndUserBudgetsAlertOncePerCrossingAndReplayTheSame() async throws {
        let harness = try AggregatorHarness()
        try RaterIntegrationTests.applyPrices(harness)
        _ = try harness.tally(["webhooks", "add", "https://hooks.example.com/budgets", "--types", "budget.threshold,budget.limit_reached"])
        let (ingest, base, usageKey) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let adminKey = try harness.createKey(["--grants"])
        func put(_ budget: String, _ body: String, key: String? = nil) throws -> HTTPResponse {
            try http("PUT", "\(base)/v1/customers/acme/budgets/\(budget)", body: body, authorization: "Bearer \(key ?? adminKey)")
        }

        // Refused: a usage key; a zero limit and an unknown field, each named.
        XCTAssertEqual(try put("search-team", #"{"period": "month", "measure": "tokens", "limit": "10000"}"#, key: usageKey).status, 403)
        let invalid = try put("search-team", #"{"period": "month", "measure": "tokens", "limit": "0", "owner": "x"}"#)
        XCTAssertEqual(invalid.status, 400, invalid.body)
        XCTAssertTrue(invalid.body.contains(#""field":"limit""#) && invalid.body.contains(#""field":"owner""#), invalid.body)

        // The search team: 10,000 tokens a month, alerts at 50 and 80 %. End user u1: $0.02 a day, alert at 50 %.
        let team = try put("search-team", #"{"period": "month", "measure": "tokens", "limit": "10000", "alert_at": [50, 80], "dimensions": {"team": "search"}}"#)
        XCTAssertEqual(team.status, 202, team.body)
        let user = try put("u1-daily", #"{"id": "u1-v1", "period": "day", "measure": "money", "currency": "USD", "limit": "0.02", "alert_at": [50], "dimensions": {"end_user": "u1"}}"#)
        XCTAssertEqual(user.status, 202, user.body)
        XCTAssertTrue(user.body.contains(#""id":"u1-v1""#), user.body)

        // Calls e1…e15: e1–e12 of the search team, e13–e15 of ads; odd ones by u1 (8 calls), even by u2.
        let now = EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000))
        var calls = (1...15).map { Self.call("e\($0)", team: $0 <= 12 ? "search" : "ads", user: $0 % 2 == 1 ? "u1" : "u2", at: now) }
        calls.append(Self.call("other", customer: "beta", team: "search", user: "u1", at: now))  // another customer's budgets are its own
        try await harness.publish(calls)
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)

        func alerts() throws -> [String] {
            try harness.connection.query("""
                SELECT budget || ' ' || kind || ' ' || percent || ' ' || used || ' ' || e.event_id
                FROM tally.budget_alerts a
                JOIN tally.rater_event_keys e ON e.partition = a.partition AND e.record_offset = a.record_offset
                ORDER BY a.partition, a.record_offset, budget, percent
                """).rows.map { $0[0]! }
        }
        // Team: 1,000 tokens a call, so 5,000 at e5, 8,000 at e8, 10,000 at e10. u1: $0.0055 a call,
        // so $0.011 ≥ $0.01 at its 2nd call (e3) and $0.022 ≥ $0.02 at its 4th (e7).
        let expected = ["u1-daily budget.threshold 50 11000000 e3", "search-team budget.threshold 50 5000 e5",
                        "u1-daily budget.limit_reached 100 22000000 e7", "search-team budget.threshold 80 8000 e8",
                        "search-team budget.limit_reached 100 10000 e10"]
        XCTAssertTrue(try TestStack.eventually { try alerts() == expected }, "\((try? alerts()) ?? []) \(rater.log.suffix(3000))")
        let listed = try harness.tally(["budgets", "list", "--customer", "acme", "--format", "csv"])
        XCTAssertTrue(listed.contains("acme,search-team,month,tokens,10000,12000,0,120%"), listed)
        XCTAssertTrue(listed.contains("acme,u1-daily,day,USD,0.02,0.044,0.00,220%"), listed)
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.budget_usage WHERE customer_id = 'beta'").scalar, "0")

        // Every alert became a webhook message of its kind, with what it compared.
        XCTAssertTrue(TestStack.eventually { (try? harness.connection.query("SELECT count(*) FROM tally.webhook_messages").scalar) == "5" })
        let messages = try harness.connection.query("SELECT event_type, payload FROM tally.webhook_messages ORDER BY occurred_at, message_id").rows
        XCTAssertEqual(messages.filter { $0[0] == "budget.threshold" }.count, 3)
        XCTAssertEqual(messages.filter { $0[0] == "budget.limit_reached" }.count, 2)
        let reached = try XCTUnwrap(messages.first { $0[1]!.contains(#""budget":"search-team""#) && $0[0] == "budget.limit_reached" }?[1])
        let payload = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(reached.utf8)) as? [String: Any])
        let data = try XCTUnwrap(payload["data"] as? [String: Any])
        XCTAssertEqual(data["used"] as? String, "10000")
        XCTAssertEqual(data["limit"] as? String, "10000")
        XCTAssertEqual(data["unit"] as? String, "tokens")
        XCTAssertEqual(data["percent"] as? Int, 100)
        XCTAssertEqual(data["dimensions"] as? [String: String], ["team": "search"])

        // A raised limit keeps the 12,000 counted; its 80 % (16,000) and 100 % (20,000) alert anew,
        // its 50 % (10,000) was behind it already. The end user's budget is removed.
        XCTAssertEqual(try put("search-team", #"{"period": "month", "measure": "tokens", "limit": "20000", "alert_at": [50, 80], "dimensions": {"team": "search"}}"#).status, 202)
        let removed = try http("DELETE", "\(base)/v1/customers/acme/budgets/u1-daily", authorization: "Bearer \(adminKey)")
        XCTAssertEqual(removed.status, 202, removed.body)
        // Published after the two declarations (one partition per customer): the rater reads them first.
        try await harness.publish((16...23).map { Self.call("e\($0)", team: "search", user: "u1", at: now) })
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertTrue(try TestStack.eventually { try alerts().count == 7 }, "\((try? alerts()) ?? [])")
        XCTAssertEqual(Array(try alerts().suffix(2)), ["search-team budget.threshold 80 16000 e19", "search-team budget.limit_reached 100 20000 e23"])
        let after = try harness.tally(["budgets", "list", "--customer", "acme", "--format", "csv"])
        XCTAssertTrue(after.contains("acme,search-team,month,tokens,20000,20000,0,100%"), after)
        XCTAssertFalse(after.contains("u1-daily"), after)
        // The dashboard views say the same.
        XCTAssertEqual(try harness.connection.query("""
            SELECT budget, limit_value::text, used::text, used_percent::text, enforced::text, dimensions FROM tally.dashboard_budgets
            """).rows, [["search-team", "20000", "20000", "100.0", "true", #"{"team": "search"}"#]])
        XCTAssertEqual(try harness.connection.query("""
            SELECT kind, percent::text AS p, used::text, limit_value::text FROM tally.dashboard_budget_alerts WHERE budget = 'u1-daily' ORDER BY percent
            """).rows, [["budget.threshold", "50", "0.011000000", "0.020000000"], ["budget.limit_reached", "100", "0.022000000", "0.020000000"]])
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.budget_usage WHERE budget = 'u1-daily'").scalar, "0")
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)

        // A replay from offset zero rebuilds budgets, usage and alerts exactly.
        try assertReplayEqual(harness, rows: ["budgets": 1, "budget_usage": 1, "budget_alerts": 7])
    }

    /// `tally replay --consumer rater --dry-run` finds nothing different, and the tables named
    /// hold that many rows, live and replayed, with equal checksums.
    func assertReplayEqual(_ harness: AggregatorHarness, rows: [String: Int], file: StaticString = #filePath, line: UInt = #line) throws {
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"), [
            "replay", "--consumer", "rater", "--dry-run", "--live-group", harness.group, "--topic", harness.topic, "--database-url", harness.databaseURL,
        ])
        XCTAssertEqual(status, 0, output, file: file, line: line)
        let sums = output.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        for (table, count) in rows {
            XCTAssertTrue(sums.contains { $0.first == table && $0.count == 6 && $0[1] == String(count) && $0[3] == String(count) && $0[5] == "yes" },
                          "\(table): \(output)", file: file, line: line)
        }
    }

    /// `POST /v1/check` for applications that call models themselves: holds reserve estimates
    /// until the usage event with the same id is counted (or the hold lapses), so checks made
    /// at once cannot all spend the same remainder.
    func testCheckHoldsAreSettledByTheirEventOrLapse() async throws {
        let harness = try AggregatorHarness()
        // The rater's group: its offsets say which settled holds it has counted.
        let (ingest, base, usageKey) = try harness.startIngest(extra: ["--rater-group", harness.group])
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let declared = try http("PUT", "\(base)/v1/customers/acme/budgets/summaries",
                                body: #"{"period": "day", "measure": "tokens", "limit": "1000", "dimensions": {"feature": "summaries"}}"#,
                                authorization: "Bearer \(try harness.createKey(["--grants"]))")
        XCTAssertEqual(declared.status, 202, declared.body)
        let rater = try harness.startRater()
        XCTAssertTrue(try TestStack.eventually { try harness.connection.query("SELECT count(*) FROM tally.budgets").scalar == "1" }, rater.log)

        func check(_ body: String) throws -> [String: Any] {
            let response = try http("POST", "\(base)/v1/check", body: body, authorization: "Bearer \(usageKey)")
            XCTAssertEqual(response.status, 200, response.body)
            return try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any], response.body)
        }
        func standing(_ answer: [String: Any]) throws -> [String: String] {
            let budget = try XCTUnwrap((answer["budgets"] as? [[String: Any]])?.first, "\(answer)")
            return budget.compactMapValues { $0 as? String }
        }
        let asked = #"{"customer": "acme", "dimensions": {"feature": "summaries", "model": "gpt-4o"}, "tokens": 600, "hold": true, "event_id": "#
        // 1,000 left: the first two holds of 600 are admitted (something was left), the third is not.
        let first = try check(asked + #""e-1"}"#)
        XCTAssertEqual(first["allowed"] as? Bool, true)
        XCTAssertEqual((first["hold"] as? [String: Any])?["event_id"] as? String, "e-1")
        XCTAssertEqual(try check(asked + #""e-2", "hold_seconds": 10}"#)["allowed"] as? Bool, true)
        let third = try check(asked + #""e-3"}"#)
        XCTAssertEqual(third["allowed"] as? Bool, false)
        XCTAssertEqual(third["refused_by"] as? String, "summaries")
        XCTAssertEqual(try standing(third)["held"], "1200")
        XCTAssertEqual(try standing(third)["remaining"], "-200")
        // Another feature is under no budget.
        let other = try check(#"{"customer": "acme", "dimensions": {"feature": "search"}, "tokens": 5000}"#)
        XCTAssertEqual(other["allowed"] as? Bool, true)
        XCTAssertEqual((other["budgets"] as? [Any])?.count, 0)

        // e-1 arrives using 300 tokens: its hold becomes 300 until the rater has counted it; e-2
        // never comes and lapses after 10 s. Then only what was counted is left: 1,000 − 300.
        let event = UsageEvent(id: "e-1", source: "app", subject: "acme", time: EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1e6)),
                               model: "gpt-4o", feature: "summaries", inputTokens: 200, outputTokens: 100)
        let posted = try http("POST", "\(base)/v1/events", body: String(decoding: EventEncoder.encode(event), as: UTF8.self), authorization: "Bearer \(usageKey)")
        XCTAssertEqual(posted.status, 202, posted.body)
        let settled = try standing(try check(#"{"customer": "acme", "dimensions": {"feature": "summaries"}}"#))
        XCTAssertEqual((Int(settled["used"] ?? "") ?? -1) + (Int(settled["held"] ?? "") ?? -1), 900, "\(settled)")
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(30)) {
            try standing(try check(#"{"customer": "acme", "dimensions": {"feature": "summaries"}}"#)) .filter { ["used", "held", "remaining"].contains($0.key) }
                == ["used": "300", "held": "0", "remaining": "700"]
        }, rater.log.suffix(2000) + "\((try? check(#"{"customer": "acme"}"#)) ?? [:])")
        // The same figures from the read endpoint.
        let listed = try http("GET", "\(base)/v1/customers/acme/budgets", authorization: "Bearer \(usageKey)")
        XCTAssertEqual(listed.status, 200, listed.body)
        XCTAssertTrue(listed.body.contains(#""used":"300""#) && listed.body.contains(#""remaining":"700""#), listed.body)

        // Bad requests name each field.
        let invalid = try http("POST", "\(base)/v1/check", body: #"{"tokens": -1, "hold": true, "colour": "red"}"#, authorization: "Bearer \(usageKey)")
        XCTAssertEqual(invalid.status, 400, invalid.body)
        for field in ["customer", "tokens", "event_id", "colour"] { XCTAssertTrue(invalid.body.contains(#""field":"\#(field)""#), "\(field): \(invalid.body)") }
    }

    /// An agent stuck in a loop: 200 calls under one run_id against a budget of 50 calls per run
    /// raise one runaway alert naming the run (and its webhook message); runs of 10 calls raise
    /// none; a replay raises the same.
    func testAnAgentLoopRaisesOneRunawayAlert() async throws {
        let harness = try AggregatorHarness()
        _ = try harness.tally(["webhooks", "add", "https://hooks.example.com/runaways", "--types", "usage.runaway"])
        let now = EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000))
        let guardRuns = BudgetEvent(id: "run-guard-1", source: "test", subject: "acme", time: now, name: "run-guard",
                                    definition: BudgetDefinition(name: "run-guard", period: .total, measure: .calls, limit: 50, enforced: false,
                                                                 dimensions: ["feature": "agent"], per: "run_id"))
        var records: [(key: String, value: [UInt8])] = [("acme", EventEncoder.encode(guardRuns))]
        func call(_ id: String, run: String) -> (key: String, value: [UInt8]) {
            ("acme", EventEncoder.encode(UsageEvent(id: id, source: "agent", subject: "acme", time: now, model: "gpt-4o", feature: "agent",
                                                    inputTokens: 900, outputTokens: 100, properties: ["run_id": run])))
        }
        for run in 1...3 { for step in 1...10 { records.append(call("r\(run)-\(step)", run: "run-\(run)")) } }
        for step in 1...200 { records.append(call("loop-\(step)", run: "run-loop")) }
        try await harness.publish(records)
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        let alerts = try harness.connection.query("""
            SELECT a.kind, a.value, a.used::text, e.event_id FROM tally.budget_alerts a
            JOIN tally.rater_event_keys e ON e.partition = a.partition AND e.record_offset = a.record_offset
            """).rows
        XCTAssertEqual(alerts, [["usage.runaway", "run-loop", "50", "loop-50"]])
        XCTAssertEqual(try harness.connection.query("SELECT value, used::text FROM tally.budget_usage ORDER BY value").rows,
                       [["run-1", "10"], ["run-2", "10"], ["run-3", "10"], ["run-loop", "200"]])
        XCTAssertTrue(TestStack.eventually { (try? harness.connection.query("SELECT count(*) FROM tally.webhook_messages").scalar) == "1" })
        let payload = try XCTUnwrap(try harness.connection.query("SELECT event_type, payload FROM tally.webhook_messages").rows.first)
        XCTAssertEqual(payload[0], "usage.runaway")
        XCTAssertTrue(payload[1]!.contains(#""per":"run_id","value":"run-loop""#) && payload[1]!.contains(#""used":"50","limit":"50""#), payload[1]!)
        let listed = try harness.tally(["budgets", "list", "--format", "csv"])
        XCTAssertTrue(listed.contains("acme,run-guard,total,calls,50,200,0,400%,10000-01-01T00:00:00Z,soft,,feature=agent,run_id=run-loop"), listed)
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)
        try assertReplayEqual(harness, rows: ["budget_usage": 4, "budget_alerts": 1])
    }

    /// A usage spike: a day of steady hours, then an hour at more than five times their mean.
    /// The watch per feature raises one anomaly alert naming what it compared (and its webhook
    /// message); the steady feature raises none; a replay raises the same.
    func testAUsageSpikeRaisesOneAnomalyAlertAndAReplayTheSame() async throws {
        let harness = try AggregatorHarness()
        _ = try harness.tally(["webhooks", "add", "https://hooks.example.com/anomalies", "--types", "usage.anomaly"])
        let hour: Int64 = 3_600_000_000
        let thisHour = Int64(Date().timeIntervalSince1970 * 1_000_000) / hour * hour
        let declaredAt = EventTime(microseconds: thisHour - 30 * hour)
        let watch = BudgetEvent(id: "spikes-1", source: "test", subject: "acme", time: declaredAt, name: "token-spikes",
                                definition: BudgetDefinition(name: "token-spikes", period: .hour, measure: .tokens, limit: 5_000, enforced: false,
                                                             per: "feature", anomaly: AnomalyRule(factorPercent: 500, baselineHours: 24)))
        var records: [(key: String, value: [UInt8])] = [("acme", EventEncoder.encode(watch))]
        func call(_ id: String, feature: String, at time: Int64) -> (key: String, value: [UInt8]) {
            ("acme", EventEncoder.encode(UsageEvent(id: id, source: "app", subject: "acme", time: EventTime(microseconds: time), model: "gpt-4o",
                                                    feature: feature, inputTokens: 800, outputTokens: 200)))
        }
        // 24 hours before this one: 2 calls (2,000 tokens) an hour of each feature.
        for back in 1...24 {
            for n in 0..<2 {
                for feature in ["search", "chat"] { records.append(call("\(feature)-\(back)-\(n)", feature: feature, at: thisHour - Int64(back) * hour + Int64(n) * 60_000_000)) }
            }
        }
        // This hour: search spikes to 15 calls; chat stays at 2.
        for n in 0..<15 { records.append(call("spike-\(n)", feature: "search", at: thisHour + Int64(n) * 1_000_000)) }
        for n in 0..<2 { records.append(call("chat-now-\(n)", feature: "chat", at: thisHour + Int64(n) * 1_000_000)) }
        try await harness.publish(records)
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        // Mean 2,000 tokens an hour; five times that, 10,000, is reached by the 10th spike call.
        let alerts = try harness.connection.query("""
            SELECT a.kind, a.value, a.used::text, a.baseline::text, a.percent::text, e.event_id FROM tally.budget_alerts a
            JOIN tally.rater_event_keys e ON e.partition = a.partition AND e.record_offset = a.record_offset
            """).rows
        XCTAssertEqual(alerts, [["usage.anomaly", "search", "10000", "2000", "500", "spike-9"]])
        XCTAssertTrue(TestStack.eventually { (try? harness.connection.query("SELECT count(*) FROM tally.webhook_messages").scalar) == "1" })
        let payload = try XCTUnwrap(try harness.connection.query("SELECT payload FROM tally.webhook_messages").rows.first?[0] ?? nil)
        for part in [#""used":"10000""#, #""baseline":"2000""#, #""factor":"5""#, #""baseline_hours":24"#, #""per":"feature","value":"search""#] {
            XCTAssertTrue(payload.contains(part), "\(part): \(payload)")
        }
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)
        try assertReplayEqual(harness, rows: ["budget_alerts": 1])
    }
}

