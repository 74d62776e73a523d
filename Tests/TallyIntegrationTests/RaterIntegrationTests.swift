import Foundation
import TallyCore
import TallyKafka
import TallyPostgres
import XCTest

/// The real tally-rater (and tally CLI) against the real broker and PostgreSQL. Expected money is
/// computed here from the events and the list below, independently of the rater's pricing code.
final class RaterIntegrationTests: XCTestCase {
    /// Nano-units per 1M tokens; amazon.nova-pro-v1 is deliberately left out (unpriced).
    static let rates: [String: [String: Int128]] = [
        "gpt-4o": ["input": 2_500_000_000, "output": 10_000_000_000, "cache_read": 1_250_000_000],
        "gpt-4o-mini": ["input": 150_000_000, "output": 600_000_000],
        "o3-mini": ["input": 1_100_000_000, "output": 4_400_000_000],
        "claude-sonnet-4": ["input": 3_000_000_000, "output": 15_000_000_000, "cache_read": 300_000_000, "cache_write": 3_750_000_000],
        "claude-haiku-3.5": ["input": 800_000_000, "output": 4_000_000_000],
        "gemini-2.5-pro": ["input": 1_250_000_000, "output": 10_000_000_000],
    ]

    static let priceBook = """
        book: default
        effective_from: 2026-01-01T00:00:00Z
        currency: USD
        minimum_per_period: "5.00"
        models:
          - { model: gpt-4o, input: "2.50", output: "10.00", cache_read: "1.25" }
          - { model: gpt-4o-mini, input: "0.15", output: "0.60" }
          - { model: o3-mini, input: "1.10", output: "4.40" }
          - { model: claude-sonnet-4, input: "3.00", output: "15.00", cache_read: "0.30", cache_write: "3.75" }
          - { model: claude-haiku-3.5, input: "0.80", output: "4.00" }
          - { model: gemini-2.5-pro, input: "1.25", output: "10.00" }
        """

    static func applyPrices(_ harness: AggregatorHarness) throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("prices") + ".yaml")
        try Self.priceBook.write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        XCTAssertTrue(try harness.tally(["pricing", "apply", file.path]).contains("applied default version 1"))
    }

    /// The charge of each line item of the distinct events, keyed customer, month, model and
    /// token type: quantities summed per item, each priced once, rounded half up to a nano-unit.
    static func expectedLineCharges(_ events: [UsageEvent]) -> [(customer: String, month: String, nanos: Int64)] {
        var quantities: [String: Int128] = [:]
        var seen = Set<String>()
        for event in events where seen.insert(event.subject + "\u{1}" + event.id).inserted {
            guard let rates = Self.rates[event.model] else { continue }
            let month = String(event.time.text.prefix(7))
            var input = Int128(event.inputTokens), output = Int128(event.outputTokens)
            for (type, count) in [("cache_read", event.cacheReadInputTokens), ("cache_write", event.cacheWriteInputTokens)] {
                if rates[type] != nil { quantities["\(event.subject)|\(month)|\(event.model)|\(type)", default: 0] += Int128(count); input -= Int128(count) }
            }
            quantities["\(event.subject)|\(month)|\(event.model)|input", default: 0] += input
            quantities["\(event.subject)|\(month)|\(event.model)|output", default: 0] += output
        }
        return quantities.map { key, quantity in
            let parts = key.split(separator: "|").map(String.init)
            return (parts[0], parts[1], Int64((quantity * Self.rates[parts[2]]![parts[3]]! + 500_000) / 1_000_000))
        }
    }

    /// Charge per customer and billing month (label) of the distinct events.
    static func expectedCharges(_ events: [UsageEvent]) -> [String: [String: Int64]] {
        var charges: [String: [String: Int64]] = [:]
        for line in expectedLineCharges(events) { charges[line.customer, default: [:]][line.month, default: 0] += line.nanos }
        return charges
    }

    static func grant(_ id: String, customer: String, amount: String, time: String = "2026-10-31T00:00:00Z", priority: Int64 = 100) -> (key: String, value: [UInt8]) {
        (customer, EventEncoder.encode(GrantEvent(id: id, source: "test", subject: customer, time: EventTime(time)!,
                                                  amountNanos: Money.nanos(amount)!, currency: Currency("USD")!, priority: priority)))
    }

    func int64(_ harness: AggregatorHarness, _ sql: String, _ parameters: [(any PostgresEncodable)?] = []) throws -> Int64 {
        try harness.connection.query(sql, parameters).int64(0, 0) ?? 0
    }

    /// Usage and grants through the log: balances equal grants minus independently computed charges;
    /// duplicated grants credit once; duplicated usage is charged once; unknown models are kept
    /// unpriced; poison goes to the DLQ table.
    func testBalancesEqualGrantsMinusCharges() async throws {
        let harness = try AggregatorHarness()
        try Self.applyPrices(harness)
        let customers = 30
        let events = AggregatorHarness.events(count: 20_000, seed: 51, customers: customers)
        let grants = (0..<customers).map { Self.grant("g-\($0)", customer: "cust-\($0)", amount: "\(10 + $0).25") }
        var stream: [(key: String, value: [UInt8])] = grants
        for (index, event) in events.enumerated() {
            stream.append((event.subject, EventEncoder.encode(event)))
            if index % 40 == 0 { stream.append((event.subject, EventEncoder.encode(event))) }
            if index == 10_000 { stream += grants.prefix(10) }   // re-sent grants mid-stream
        }
        stream.append(("cust-1", Array("not json".utf8)))
        stream.append(("cust-2", Array(#"{"specversion":"1.0","type":"tally.wallet.grant"}"#.utf8)))
        try await harness.publish(stream)
        let first = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), "consumed\n\(first.log)")
        first.signal(SIGTERM)
        XCTAssertEqual(first.wait(timeout: .seconds(30)), 0, first.log)

        // After a restart: every grant again, 300 old events again, 100 new ones.
        let more = AggregatorHarness.events(count: 100, seed: 52, customers: customers, prefix: "late")
        try await harness.publish(grants + (events[0..<300] + more).map { ($0.subject, EventEncoder.encode($0)) })
        let second = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), "consumed after restart\n\(second.log)")
        // The ops endpoint: Prometheus names with the tally_rater_ prefix, no customer id in any label.
        let port = try XCTUnwrap(second.opsPort, second.log)
        XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/readyz").status, 200)
        let metrics = try MetricsScrape.waiting(port: port) { $0.sample("tally_rater_events_accepted_total") == Double(more.count) }
        let moreUnpriced = Set(more.filter { $0.model == "amazon.nova-pro-v1" }.map(\.id)).count
        XCTAssertEqual(metrics.sample("tally_rater_events_accepted_total"), Double(more.count), "the restarted instance counted the 100 new events\n\(metrics.text)")
        XCTAssertEqual(metrics.sample("tally_rater_duplicates_total"), Double(customers + 300), "every grant and 300 events again")
        XCTAssertEqual(metrics.sample("tally_rater_unpriced_events_total"), Double(moreUnpriced))
        XCTAssertEqual(metrics.sample("tally_rater_grants_total"), 0, "grants re-sent after the restart credit nothing")
        XCTAssertTrue(metrics.text.contains("tally_rater_lag_records{partition="), metrics.text)
        XCTAssertFalse(metrics.text.contains("cust-"), "no customer id in any label")
        second.signal(SIGTERM)
        XCTAssertEqual(second.wait(timeout: .seconds(30)), 0, second.log)

        let charges = Self.expectedCharges(events + more)
        let balances = try harness.connection.query("SELECT customer_id, balance_nanos FROM tally.wallets WHERE currency = 'USD'")
        XCTAssertEqual(balances.rowCount, customers)
        for row in 0..<balances.rowCount {
            let customer = balances.string(row, 0)!
            let number = Int64(customer.dropFirst(5))!
            let granted = Money.nanos("\(10 + number).25")!
            let charged = charges[customer]?.values.reduce(0, +) ?? 0
            XCTAssertEqual(try balances.int64(row, 1), granted - charged, "\(customer): grants minus charges")
            // Balance = sum of the ledger's and the overage entries, and the view says the same exactly.
            XCTAssertEqual(try int64(harness, """
                SELECT (SELECT sum(amount_nanos) FROM tally.wallet_ledger WHERE customer_id = $1)
                       + (SELECT coalesce(sum(amount_nanos), 0) FROM tally.wallet_overage WHERE customer_id = $1)
                """, [customer]), granted - charged)
            XCTAssertEqual(try harness.connection.query("SELECT balance = ($2::bigint)::numeric / 1000000000 FROM tally.wallet_balances WHERE customer_id = $1",
                                                        [customer, granted - charged]).scalar, "t", "\(customer): wallet_balances view")
        }
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.wallet_ledger WHERE kind = 'grant'"), Int64(customers), "each grant credited once")
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.wallet_ledger l WHERE kind = 'usage' AND NOT EXISTS (SELECT 1 FROM tally.rater_event_keys k WHERE k.customer_id = l.customer_id AND k.event_id = l.event_id)"), 0,
                       "every debit references a counted usage event")
        XCTAssertEqual(try int64(harness, """
            SELECT count(*) FROM tally.wallet_overage o WHERE NOT EXISTS (SELECT 1 FROM tally.rater_event_keys k
                WHERE k.customer_id = o.customer_id AND k.partition = o.partition AND k.record_offset = o.first_offset)
               OR NOT EXISTS (SELECT 1 FROM tally.rater_event_keys k
                WHERE k.customer_id = o.customer_id AND k.partition = o.partition AND k.record_offset = o.last_offset)
            """), 0, "every overage entry names counted usage events")
        XCTAssertGreaterThan(try int64(harness, "SELECT count(*) FROM tally.wallet_overage"), 0, "some usage went past its credit")
        XCTAssertEqual(try int64(harness, """
            SELECT -(SELECT sum(amount_nanos) FROM tally.wallet_ledger WHERE kind = 'usage') - (SELECT sum(amount_nanos) FROM tally.wallet_overage)
            """), try int64(harness, "SELECT sum(amount_nanos) FROM tally.rated_usage"), "debits add up to the rated totals")
        let unpriced = Set((events + more).filter { $0.model == "amazon.nova-pro-v1" }.map(\.id)).count
        XCTAssertGreaterThan(unpriced, 0)
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.unpriced_usage WHERE model = 'amazon.nova-pro-v1'"), Int64(unpriced))
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.dead_letters WHERE consumer_group = $1", [harness.group]), 2)
        XCTAssertTrue(second.log.contains("unpriced="), second.log)
    }

    /// Issue #19: LiteLLM's own price list, from the current litellm wheel (scripts/stack fetches it),
    /// imports whole: linear parsing, every price exact, context tiers kept, and each model it
    /// leaves out named with its reason. Then a gemini-2.5-pro request above 200k input tokens is
    /// rated at the tier's prices: 250,000 × 2.50 + 1,000 × 15.00 per 1M = 0.64.
    func testTheRealLiteLLMPriceListImports() async throws {
        let directory = try XCTUnwrap(ProcessInfo.processInfo.environment["TALLY_STACK_DIR"]) + "/litellm"
        let file = directory + "/model_prices_and_context_window_backup.json"
        let version = (try? String(contentsOfFile: directory + "/VERSION", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
        let harness = try AggregatorHarness()
        let started = ContinuousClock.now
        let output = try harness.tally(["pricing", "import-litellm", file, "--book", "litellm", "--effective-from", "2026-01-01T00:00:00Z", "--apply"])
        let elapsed = ContinuousClock.now - started
        let summary = try XCTUnwrap(output.split(separator: "\n").first { $0.contains("models imported") }, output)
        print("LiteLLM \(version) price list: \(summary) in \(elapsed)")
        XCTAssertTrue(output.contains("applied litellm version 1"), output)
        let imported = try XCTUnwrap(Int(summary.split(separator: " ")[0]))
        XCTAssertGreaterThan(imported, 1_000, "most of the ~4,900 entries are priced per token")
        let skippedLines = output.split(separator: "\n").filter { $0.hasPrefix("skipped ") }
        XCTAssertTrue(skippedLines.allSatisfy { $0.contains(": ") }, "every skipped model has its reason")
        XCTAssertTrue(summary.contains("\(skippedLines.count) skipped"), "\(summary) vs \(skippedLines.count) lines")

        try harness.tally(["customers", "set", "acme", "--plan", "litellm"])
        let event = UsageEvent(id: "long", source: "t", subject: "acme", time: EventTime("2026-03-01T12:00:00Z")!, model: "gemini/gemini-2.5-pro",
                               inputTokens: 250_000, outputTokens: 1_000)
        // LiteLLM's gpt-4o batch price, 1.25 per 1M input tokens (half the 2.50 list price), as a rule.
        let batch = UsageEvent(id: "batch", source: "t", subject: "acme", time: EventTime("2026-03-01T12:00:00Z")!, model: "gpt-4o",
                               inputTokens: 1_000_000, outputTokens: 0, properties: ["batch": "true"])
        try await harness.publish([event, batch])
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)
        XCTAssertEqual(try int64(harness, "SELECT sum(amount_nanos) FROM tally.rated_usage WHERE model LIKE 'gemini%'"), 640_000_000)
        XCTAssertEqual(try harness.connection.query("SELECT DISTINCT context_above FROM tally.rated_usage WHERE model LIKE 'gemini%'").rows, [["200000"]])
        XCTAssertEqual(try int64(harness, "SELECT sum(amount_nanos) FROM tally.rated_usage WHERE model = 'gpt-4o'"), 1_250_000_000)
        // No credit: both charges are acme's overage of 2026-03-01, one entry of two events.
        XCTAssertEqual(try harness.connection.query("SELECT day::text, amount_nanos::text, entries FROM tally.wallet_overage WHERE customer_id = 'acme'").rows,
                       [["2026-03-01", "-1890000000", "2"]])
        XCTAssertEqual(try harness.connection.query("SELECT price_rule FROM tally.rated_usage WHERE model = 'gpt-4o'").rows, [["batch"]])
    }

    /// Issue #19: a period whose lines add up past the largest amount is refused with its reason,
    /// and the other customers' periods close. whale: 3 × 10^15 input tokens of gpt-4o at 2.50 per
    /// 1M (7.5 billion, which its wallet can owe) and a subscription fee of 5 billion: each line
    /// fits, the total (12.5 billion) does not.
    func testAnInvoicePastTheLimitIsRefusedAndTheOthersClose() async throws {
        let harness = try AggregatorHarness()
        try Self.applyPrices(harness)
        try harness.tally(["customers", "set", "whale", "--subscription-fee", "5000000000"])
        let whale = (0..<3).map { UsageEvent(id: "w\($0)", source: "t", subject: "whale", time: EventTime("2026-10-05T10:00:00Z")!, model: "gpt-4o",
                                             inputTokens: 1_000_000_000_000_000, outputTokens: 0) }
        let minnow = UsageEvent(id: "m1", source: "t", subject: "minnow", time: EventTime("2026-10-05T10:00:00Z")!, model: "gpt-4o",
                                inputTokens: 1_000_000, outputTokens: 100_000)
        try await harness.publish(whale + [minnow])
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.unrateable_records"), 0, "every event fits its own line")
        let (status, output) = try harness.tallyStatus(["invoices", "close", "--period", "2026-10"])
        XCTAssertEqual(status, 1, output)
        XCTAssertTrue(output.contains("INV-2026-10-minnow-USD") && output.contains("closed 1 invoices"), output)
        XCTAssertTrue(output.contains("not closed: whale 2026-10: the total due passes the largest amount"), output)
        // minnow: 1M × 2.50 + 100k × 10.00 per 1M = 3.50, under the 5.00 minimum: 5.00 due.
        XCTAssertEqual(try int64(harness, "SELECT total_due_nanos FROM tally.invoices WHERE customer_id = 'minnow'"), 5_000_000_000)
    }

    /// Issue #19: usage of a model no book prices is kept aside and listed by `tally status`; once a
    /// price exists, `tally pricing rate-unpriced` has it rated without a replay, exactly once;
    /// `tally pricing apply` warns when a model with usage would lose its price.
    func testUnpricedUsageIsRatedOnceAPriceExists() async throws {
        let harness = try AggregatorHarness()
        try Self.applyPrices(harness)
        func usage(_ id: String, _ model: String, input: Int64, output: Int64) -> UsageEvent {
            UsageEvent(id: id, source: "test", subject: "dana", time: EventTime("2026-11-02T10:00:00Z")!, model: model,
                       inputTokens: input, outputTokens: output, properties: ["team": "search"])
        }
        try await harness.publish([usage("n1", "brand-new", input: 1_000_000, output: 100_000), usage("n2", "brand-new", input: 10, output: 0),
                                   usage("p1", "gpt-4o", input: 1_000, output: 0)])
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.unpriced_usage WHERE model = 'brand-new'"), 2)
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(10)) { rater.log.contains("unpriced usage: no price book prices brand-new") }, rater.log)
        let status = try harness.tally(["status", "--topic", harness.topic])
        XCTAssertTrue(status.contains("unpriced usage") && status.contains("brand-new"), status)

        // Nothing has a price yet: nothing is sent.
        XCTAssertTrue(try harness.tally(["pricing", "rate-unpriced", "--topic", harness.topic]).contains("sent 0 unpriced events"))
        let file = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("prices") + ".yaml")
        defer { try? FileManager.default.removeItem(at: file) }
        try (Self.priceBook + "\n  - { model: brand-new, input: \"1.00\", output: \"2.00\" }\n").write(to: file, atomically: true, encoding: .utf8)
        XCTAssertTrue(try harness.tally(["pricing", "apply", file.path]).contains("applied default version 2"))
        let sent = try harness.tally(["pricing", "rate-unpriced", "--topic", harness.topic])
        XCTAssertTrue(sent.contains("sent 2 unpriced events"), sent)
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(60)) {
            try self.int64(harness, "SELECT count(*) FROM tally.unpriced_usage") == 0
        }, rater.log)
        // 1,000,000 × 1.00 + 100,000 × 2.00 per 1M = 1.20; 10 × 1.00 per 1M = 0.00001.
        XCTAssertEqual(try int64(harness, "SELECT sum(amount_nanos) FROM tally.rated_usage WHERE model = 'brand-new'"), 1_200_010_000)
        // With p1's 1,000 gpt-4o tokens at 2.50 per 1M (0.0025): dana has no credit, all of it is overage.
        XCTAssertEqual(try int64(harness, "SELECT -sum(amount_nanos) FROM tally.wallet_overage WHERE customer_id = 'dana'"), 1_202_510_000)
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.event_conflicts"), 0, "the copy has the original's content")
        // Sent again: the copies are duplicates with nothing kept aside, and charge nothing more.
        XCTAssertTrue(try harness.tally(["pricing", "rate-unpriced", "--topic", harness.topic]).contains("sent 0 unpriced events"))
        try await harness.publish([usage("p2", "gpt-4o", input: 1_000, output: 0)])
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertEqual(try int64(harness, "SELECT sum(amount_nanos) FROM tally.rated_usage WHERE model = 'brand-new'"), 1_200_010_000)
        XCTAssertEqual(try int64(harness, "SELECT -sum(amount_nanos) FROM tally.wallet_overage WHERE customer_id = 'dana'"), 1_205_010_000, "and p2's 0.0025")
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)

        // A version that drops a model with usage is applied with a warning.
        try Self.priceBook.replacingOccurrences(of: "  - { model: gpt-4o, input: \"2.50\", output: \"10.00\", cache_read: \"1.25\" }\n", with: "")
            .write(to: file, atomically: true, encoding: .utf8)
        let applied = try harness.tally(["pricing", "apply", file.path])
        XCTAssertTrue(applied.contains("warning: gpt-4o has usage") && applied.contains("applied default version 3"), applied)
    }

    /// kill -9 at random moments: the ledger, rated usage, grants, balances and invoices end up
    /// identical to a run without crashes over the same log (in a second database).
    func testKillNineChangesNothing() async throws {
        let crashed = try AggregatorHarness()
        let clean = try AggregatorHarness(sharedTopic: crashed.topic)
        for harness in [crashed, clean] {
            try Self.applyPrices(harness)
            try harness.tally(["customers", "set", "cust-0", "--low-balance", "30,10", "--auto-topup-below", "10", "--auto-topup-amount", "50"])
        }
        let events = AggregatorHarness.events(count: 60_000, seed: 61, customers: 50)
        var stream: [(key: String, value: [UInt8])] = (0..<50).map { Self.grant("g-\($0)", customer: "cust-\($0)", amount: "40") }
        var random = SeededGenerator(seed: 7)
        for (index, event) in events.enumerated() {
            stream.append((event.subject, EventEncoder.encode(event)))
            if index % 25 == 0 {
                let resent = events[Int.random(in: 0...index, using: &random)]
                stream.append((resent.subject, EventEncoder.encode(resent)))
            }
            if index % 5000 == 0 { stream.append(Self.grant("top-\(index)", customer: "cust-0", amount: "7.5", time: event.time.text)) }
            // Issue #19: valid records that cannot be rated (2^53 - 1 input tokens of gpt-4o cost
            // 22,517,998,136.85 USD, past an amount's range) sit in batches among the others.
            if index % 20_000 == 10_000 {
                let huge = UsageEvent(id: "huge-\(index)", source: "t", subject: "cust-3", time: event.time, model: "gpt-4o",
                                      inputTokens: 9_007_199_254_740_991, outputTokens: 0)
                stream.append((huge.subject, EventEncoder.encode(huge)))
            }
        }
        let producing = Task { try await crashed.publish(stream) }
        for _ in 0..<3 {
            let instance = try crashed.startRater(["--batch-size", "1500"])
            try await Task.sleep(for: .seconds(Double.random(in: 6...8, using: &random)))
            instance.signal(SIGKILL)
            instance.wait()
        }
        try await producing.value
        clean.adoptLogEnd(of: crashed)
        let finisher = try crashed.startRater()
        let reference = try clean.startRater(["--batch-size", "5000"])
        XCTAssertTrue(try crashed.waitUntilConsumed(timeout: .seconds(180)), "crashed run consumed\n\(finisher.log)")
        XCTAssertTrue(try clean.waitUntilConsumed(timeout: .seconds(180)), "clean run consumed\n\(reference.log)")
        for table in ["wallet_ledger", "wallet_overage", "rated_usage", "wallet_grants", "wallets", "balance_alerts", "topup_requests", "unpriced_usage",
                      "unrateable_records"] {
            // Published-at and webhook stamps are wall-clock and ids come from a sequence that rolled-back
            // transactions also draw on; everything else must match row for row.
            let checksum = """
                SELECT count(*)::text || ' ' || md5(coalesce(string_agg(row_text, '|' ORDER BY row_text), ''))
                FROM (SELECT (to_jsonb(t) - 'published_at' - 'webhook_at' - 'id')::text AS row_text FROM tally.\(table) t) rows
                """
            let a = try crashed.connection.query(checksum).scalar, b = try clean.connection.query(checksum).scalar
            XCTAssertEqual(a, b, "\(table) differs after kill -9")
            XCTAssertFalse(a?.hasPrefix("0 ") ?? true, "\(table) has rows")
        }
        XCTAssertGreaterThan(try int64(crashed, "SELECT count(*) FROM tally.balance_alerts"), 0, "cust-0 crossed its thresholds")
        let keptAside = try crashed.connection.query("SELECT event_id, reason FROM tally.unrateable_records ORDER BY event_id").rows
        XCTAssertEqual(keptAside.map { $0[0]! }, ["huge-10000", "huge-30000", "huge-50000"], "each once, whatever the crashes")
        XCTAssertTrue(keptAside.allSatisfy { $0[1]!.contains("9007199254740991 input tokens of gpt-4o cost 22517998136.8524775 USD") }, "\(keptAside)")
        XCTAssertEqual(try int64(crashed, "SELECT count(*) FROM tally.wallet_ledger WHERE event_id LIKE 'huge-%'"), 0, "they charged nothing")
        XCTAssertGreaterThan(try int64(crashed, """
            SELECT (SELECT count(*) FROM tally.wallet_ledger WHERE customer_id = 'cust-3' AND kind = 'usage')
                   + (SELECT count(*) FROM tally.wallet_overage WHERE customer_id = 'cust-3')
            """), 0,
                             "the same customer's other usage is rated")
        XCTAssertEqual(try crashed.tally(["invoices", "close", "--period", "2026-11", "--force"]).components(separatedBy: "\n").filter { $0.hasPrefix("INV-") }.sorted(),
                       try clean.tally(["invoices", "close", "--period", "2026-11", "--force"]).components(separatedBy: "\n").filter { $0.hasPrefix("INV-") }.sorted())
        let documents = "SELECT md5(string_agg(document, '' ORDER BY invoice_id)) FROM tally.invoices"
        XCTAssertEqual(try crashed.connection.query(documents).scalar, try clean.connection.query(documents).scalar)
        finisher.signal(SIGTERM)
        reference.signal(SIGTERM)
        XCTAssertEqual(finisher.wait(timeout: .seconds(30)), 0)
        XCTAssertEqual(reference.wait(timeout: .seconds(30)), 0)
    }

    /// 100k output tokens of gpt-4o cost exactly 1.00.
    func dollar(_ id: String, customer: String, time: String) -> UsageEvent {
        UsageEvent(id: id, source: "test", subject: customer, time: EventTime(time)!, model: "gpt-4o", inputTokens: 0, outputTokens: 100_000)
    }

    /// One alert per downward crossing of each threshold and one top-up request per crossing of
    /// the rule; published once to the alerts topic; nothing new when the same log is re-sent.
    func testLowBalanceAlertsFireOncePerCrossing() async throws {
        let harness = try AggregatorHarness()
        try Self.applyPrices(harness)
        try harness.tally(["customers", "set", "alice", "--low-balance", "5,1", "--auto-topup-below", "1", "--auto-topup-amount", "20", "--overage", "stop"])
        let alertsTopic = TestStack.unique("test.alerts")
        try KafkaAdmin(configuration: KafkaConfiguration(brokers: harness.brokers), logger: TestStack.logger).createTopic(alertsTopic, partitions: 1)
        var stream = [Self.grant("g1", customer: "alice", amount: "10", time: "2026-11-01T00:00:00Z")]
        // 10 → 0 in steps of 1.00: crosses 5 (5 → 4) and 1 (1 → 0); a 20.00 top-up → 20, down to 3: crosses 5 again (5 → 4).
        for i in 1...10 { stream.append(("alice", EventEncoder.encode(dollar("u\(i)", customer: "alice", time: "2026-11-02T00:00:0\(i % 10)Z")))) }
        stream.append(Self.grant("topup-1", customer: "alice", amount: "20", time: "2026-11-03T00:00:00Z"))
        for i in 11...27 { stream.append(("alice", EventEncoder.encode(dollar("u\(i)", customer: "alice", time: "2026-11-04T00:00:\(i)Z")))) }
        try await harness.publish(stream)
        let rater = try harness.startRater(["--alerts-topic", alertsTopic])
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)
        // Stopped right after its last commit: the relay stops after the loop and publishes what it raised.
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.balance_alerts WHERE published_at IS NULL")
                       + int64(harness, "SELECT count(*) FROM tally.topup_requests WHERE published_at IS NULL"), 0, rater.log)
        let alerts = try harness.connection.query("SELECT threshold_nanos / 1000000000, balance_nanos / 1000000000 FROM tally.balance_alerts ORDER BY partition, record_offset, alert_id").rows
        XCTAssertEqual(alerts, [["5", "4"], ["1", "0"], ["5", "4"]])
        XCTAssertEqual(try harness.connection.query("SELECT balance_nanos / 1000000000 FROM tally.topup_requests").rows, [["0"]],
                       "one request at the crossing of 1.00; none again while below")
        XCTAssertEqual(try harness.connection.query("SELECT blocked FROM tally.wallets WHERE customer_id = 'alice'").scalar, "f")

        // Re-sending the whole log changes nothing.
        try await harness.publish(stream)
        let again = try harness.startRater(["--alerts-topic", alertsTopic])
        XCTAssertTrue(try harness.waitUntilConsumed(), again.log)
        again.signal(SIGTERM)
        XCTAssertEqual(again.wait(timeout: .seconds(30)), 0)
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.balance_alerts"), 3)
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.balance_alerts WHERE published_at IS NULL"), 0)

        // What reached the alerts topic: each alert and the request, once.
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: harness.brokers), groupID: TestStack.unique("alerts-reader"), logger: TestStack.logger)
        try consumer.assign([TopicPartition(alertsTopic, 0): 0])
        var published: [String] = []
        let deadline = ContinuousClock.now + .seconds(20)
        while published.count < 4 && ContinuousClock.now < deadline {
            for record in consumer.poll(maxRecords: 100, timeout: .milliseconds(500)) {
                guard case .object(let event) = try JSONValue.parse(record.value ?? []).get() else { continue }
                published.append("\(event["type"]!.string!) \(event["id"]!.string!)")
            }
        }
        consumer.close()
        XCTAssertEqual(published.count, 4, "\(published)")
        XCTAssertEqual(published.filter { $0.hasPrefix("tally.wallet.low_balance ") }.count, 3)
        XCTAssertEqual(published.filter { $0.hasPrefix("tally.wallet.topup_requested ") }.count, 1)
    }

    /// A closed period's invoice equals an independent calculation to the cent; usage that arrives
    /// after the close appears as an adjustment line on the next invoice.
    func testInvoicesAndLateUsageAdjustments() async throws {
        let harness = try AggregatorHarness()
        try Self.applyPrices(harness)
        try harness.tally(["customers", "set", "bob", "--subscription-fee", "20"])
        func usage(_ id: String, _ time: String, input: Int64, output: Int64, model: String = "claude-sonnet-4") -> UsageEvent {
            UsageEvent(id: id, source: "test", subject: "bob", time: EventTime(time)!, model: model, inputTokens: input, outputTokens: output,
                       cacheReadInputTokens: input / 4, cacheWriteInputTokens: input / 8)
        }
        let october = [usage("o1", "2026-10-03T10:00:00Z", input: 1_234_567, output: 345_678),
                       usage("o2", "2026-10-20T10:00:00Z", input: 777_777, output: 22_222, model: "gpt-4o")]
        try await harness.publish([Self.grant("credit", customer: "bob", amount: "3.00", time: "2026-10-01T00:00:00Z")])
        try await harness.publish(october)
        var rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0)

        XCTAssertTrue(try harness.tally(["invoices", "close", "--period", "2026-10"]).contains("closed 1 invoices"))
        let usd = Currency("USD")!
        // Independent: each usage line rounded to the cent, plus the fee, minus the credit drawn.
        let octoberCharges = Self.expectedCharges(october)["bob"]!["2026-10"]!
        let lineTotal = try int64(harness, "SELECT sum(amount_nanos) FROM tally.invoice_lines WHERE kind = 'usage'")
        XCTAssertEqual(lineTotal, try independentUsageLines(october), "usage lines add up to their exact sum rounded to the cent")
        let expectedOctober = try independentUsageLines(october) + 20_000_000_000 - Int64(usd.roundToMinorUnit(Int128(min(octoberCharges, 3_000_000_000))))
        XCTAssertEqual(try int64(harness, "SELECT total_due_nanos FROM tally.invoices WHERE invoice_id = 'INV-2026-10-bob-USD'"), expectedOctober)

        // Late October usage, and November usage.
        let late = [usage("o3", "2026-10-30T23:59:59Z", input: 500_000, output: 100_000)]
        let november = [usage("n1", "2026-11-05T00:00:00Z", input: 10_000, output: 1_000, model: "gpt-4o-mini")]
        try await harness.publish(late + november)
        rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0)
        XCTAssertTrue(try harness.tally(["invoices", "close", "--period", "2026-11", "--force"]).contains("closed 1 invoices"))
        let again = try harness.tally(["invoices", "close", "--period", "2026-11", "--force"])
        XCTAssertTrue(again.contains("closed 0 invoices") && again.contains("INV-2026-11-bob-USD: already closed"), "closing twice adds nothing, and says so: \(again)")

        let lateCharge = Self.expectedCharges(october + late)["bob"]!["2026-10"]! - octoberCharges
        let adjustments = try int64(harness, "SELECT sum(exact_amount_nanos) FROM tally.invoice_lines WHERE invoice_id = 'INV-2026-11-bob-USD' AND kind = 'adjustment'")
        XCTAssertEqual(adjustments, lateCharge, "the late usage, exactly")
        let novemberUsage = Self.expectedCharges(november)["bob"]!["2026-11"]!
        let novemberLines = try harness.connection.query("SELECT kind, amount_nanos FROM tally.invoice_lines WHERE invoice_id = 'INV-2026-11-bob-USD' ORDER BY line_no").rows
        XCTAssertEqual(novemberLines.map { $0[0]! }.filter { $0 != "usage" && $0 != "adjustment" }, ["subscription", "minimum"],
                       "the credit was used up in October; November usage is under the 5.00 minimum")
        let minimum = 5_000_000_000 - novemberUsage
        // Usage and adjustment lines together add up to their exact sum rounded to the cent.
        let expectedNovember = Int64(usd.roundToMinorUnit(Int128(novemberUsage + lateCharge))) + 20_000_000_000 + Int64(usd.roundToMinorUnit(Int128(minimum)))
        XCTAssertEqual(try int64(harness, "SELECT total_due_nanos FROM tally.invoices WHERE invoice_id = 'INV-2026-11-bob-USD'"), expectedNovember)
        let html = try harness.tally(["invoices", "show", "--customer", "bob", "--period", "2026-11", "--format", "html"])
        XCTAssertTrue(html.contains("Late usage for 2026-10"), html)
        XCTAssertTrue(html.contains("<!DOCTYPE html>"))
        let json = try harness.tally(["invoices", "show", "--customer", "bob", "--period", "2026-10"])
        XCTAssertTrue(json.contains(#""total_due":"\#(usd.format(expectedOctober))""#), json)
    }

    /// Price rules through the real rater: a feature priced on its own, a service tier, the batch
    /// API at half price and failed calls split onto lines of their own, each billed at its rule's
    /// rates on lines that name the rule; a customer's override wins over the plan's rules; the
    /// replay rebuilds the same charges and reconcile finds nothing amiss.
    func testPriceRulesBillFeaturesAndServiceTiersAtTheirRates() async throws {
        let harness = try AggregatorHarness()
        let book = """
            book: default
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            models:
              - model: gpt-4o
                input: "2.50"
                output: "10.00"
                rules:
                  - { rule: summaries, when: { feature: summarize }, input: "5.00", output: "20.00" }
                  - { rule: priority, when: { service_tier: priority }, input: "4.25", output: "17.00" }
                  - { rule: batch, when: { batch: "true" }, input: "1.25", output: "5.00" }
                  - { rule: failed, when: { status: [error, cancelled] } }
            """
        XCTAssertTrue(try harness.tally(["pricing", "apply", try MeterIntegrationTests.write(book)]).contains("applied"))
        try harness.tally(["pricing", "apply", try MeterIntegrationTests.write("""
            book: default
            customer: vip
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            models:
              - { model: gpt-4o, input: "2.00", output: "8.00" }
            """)])
        func call(_ id: String, customer: String = "rules-cust", feature: String? = nil, input: Int64, output: Int64,
                  _ properties: [String: String] = [:]) -> UsageEvent {
            UsageEvent(id: id, source: "app://rules", subject: customer, time: EventTime("2026-10-05T10:00:00Z")!, model: "gpt-4o",
                       feature: feature, inputTokens: input, outputTokens: output, properties: properties)
        }
        try await harness.publish([
            call("base", input: 1_000_000, output: 100_000),                                          // 2.50 + 1.00
            call("sum", feature: "summarize", input: 200_000, output: 50_000),                        // 1.00 + 1.00
            call("prio", input: 400_000, output: 100_000, ["service_tier": "priority"]),              // 1.70 + 1.70
            call("batch", input: 2_000_000, output: 200_000, ["batch": "true"]),                      // 2.50 + 1.00
            call("err", input: 100_000, output: 0, ["status": "error"]),                              // 0.25 at the base rate
            // Two rules of one condition each hold: the first listed, summaries.
            call("sum-prio", feature: "summarize", input: 100_000, output: 10_000, ["service_tier": "priority"]), // 0.50 + 0.20
            call("vip", customer: "vip", feature: "summarize", input: 500_000, output: 0),             // the override: 1.00
        ])
        let rater = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertTrue(try harness.tally(["invoices", "close", "--period", "2026-10"]).contains("closed 2 invoices"))
        let lines = try harness.connection.query("""
            SELECT description, quantity::text, exact_amount_nanos::text, coalesce(price_rule, '') FROM tally.invoice_lines
            WHERE invoice_id = 'INV-2026-10-rules-cust-USD' AND kind = 'usage' ORDER BY line_no
            """).rows.map { $0.map { $0 ?? "" } }
        XCTAssertEqual(lines, [
            ["gpt-4o input tokens", "1000000", "2500000000", ""], ["gpt-4o output tokens", "100000", "1000000000", ""],
            ["gpt-4o input tokens (rule batch)", "2000000", "2500000000", "batch"], ["gpt-4o output tokens (rule batch)", "200000", "1000000000", "batch"],
            ["gpt-4o input tokens (rule failed)", "100000", "250000000", "failed"],
            ["gpt-4o input tokens (rule priority)", "400000", "1700000000", "priority"], ["gpt-4o output tokens (rule priority)", "100000", "1700000000", "priority"],
            ["gpt-4o input tokens (rule summaries)", "300000", "1500000000", "summaries"], ["gpt-4o output tokens (rule summaries)", "60000", "1200000000", "summaries"],
        ])
        XCTAssertEqual(try harness.connection.query("SELECT total_due_nanos FROM tally.invoices WHERE invoice_id = 'INV-2026-10-rules-cust-USD'").scalar,
                       "13350000000")
        XCTAssertEqual(try harness.connection.query("SELECT total_due_nanos FROM tally.invoices WHERE invoice_id = 'INV-2026-10-vip-USD'").scalar,
                       "1000000000")
        let json = try harness.tally(["invoices", "show", "--customer", "rules-cust", "--period", "2026-10"])
        XCTAssertTrue(json.contains(#""price_rule":"priority""#), json)
        XCTAssertEqual(try harness.connection.query("""
            SELECT string_agg(price_rule || '=' || round(revenue, 2), ',' ORDER BY price_rule) FROM tally.dashboard_price_rule_revenue
            WHERE token_type = 'output' AND currency = 'USD'
            """).scalar, "=1.00,batch=1.00,priority=1.70,summaries=1.20")
        let replay = try harness.tallyStatus(["replay", "--topic", harness.topic, "--live-group", harness.group, "--consumer", "rater", "--dry-run"])
        XCTAssertEqual(replay.status, 0, replay.output)
        XCTAssertTrue(replay.output.contains("identical: the replay rebuilt the live state exactly"), replay.output)
        let reconcile = try harness.tallyStatus(["reconcile", "--topic", harness.topic, "--rater-group", harness.group,
                                                 "--aggregator-group", harness.group + "-none"])
        XCTAssertEqual(reconcile.status, 0, reconcile.output)
        XCTAssertTrue(reconcile.output.contains("rated totals compared, 0 mismatches"), reconcile.output)
        // A new version's rule prices show in the diff.
        try harness.tally(["pricing", "apply", try MeterIntegrationTests.write(book.replacingOccurrences(of: #"input: "4.25""#, with: #"input: "4.50""#))])
        XCTAssertEqual(try harness.tally(["pricing", "diff", "default", "--from", "1"]),
                       "~ gpt-4o rule priority: when service_tier=priority: input 4.25 USD / 1M tokens; output 17.00 USD / 1M tokens → "
                       + "when service_tier=priority: input 4.50 USD / 1M tokens; output 17.00 USD / 1M tokens\n")
    }

    /// With a grace, the rater closes a period by itself once rated event time is past its end plus
    /// the grace; the period still open is left alone.
    func testPeriodsCloseAutomaticallyAfterTheGrace() async throws {
        let harness = try AggregatorHarness()
        try Self.applyPrices(harness)
        try await harness.publish([dollar("oct-1", customer: "carol", time: "2026-10-10T00:00:00Z"),
                                   dollar("oct-2", customer: "carol", time: "2026-10-31T23:00:00Z"),
                                   dollar("nov-1", customer: "carol", time: "2026-11-03T23:59:59Z")])
        let rater = try harness.startRater(["--close-invoices-after-grace-hours", "72"])
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        // 2026-11-03T23:59:59 is not yet 72 h past 2026-11-01: nothing is due.
        try await Task.sleep(for: .seconds(2))
        XCTAssertEqual(try int64(harness, "SELECT count(*) FROM tally.invoices"), 0, rater.log)
        try await harness.publish([dollar("nov-2", customer: "carol", time: "2026-11-04T00:00:00Z")])
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(30)) {
            try self.int64(harness, "SELECT count(*) FROM tally.invoices") == 1
        }, rater.log)
        XCTAssertEqual(try harness.connection.query("SELECT invoice_id, total_due_nanos FROM tally.invoices").rows,
                       [["INV-2026-10-carol-USD", "5000000000"]], "two dollars of usage, raised to the 5.00 minimum")
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)
        XCTAssertTrue(rater.log.contains("closed INV-2026-10-carol-USD"), rater.log)
    }

    /// The usage lines an invoice should carry for these events: each (model, token type) rounded to the cent.
    /// What a period's usage lines add up to: their exact sum, rounded once to the cent.
    func independentUsageLines(_ events: [UsageEvent]) throws -> Int64 {
        Int64(Currency("USD")!.roundToMinorUnit(Int128(Self.expectedLineCharges(events).reduce(0) { $0 + $1.nanos })))
    }
}
