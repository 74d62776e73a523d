import Foundation
import TallyCore
import TallyPostgres
import XCTest

/// `tally replay`, `checksum` and `reconcile`, and the dashboard views, with the real executables, broker and PostgreSQL.
final class ReplayIntegrationTests: XCTestCase {
    /// A rated and aggregated log: grants, usage with duplicates, a poison record.
    func preparedHarness() async throws -> (AggregatorHarness, [UsageEvent]) {
        let harness = try AggregatorHarness()
        try RaterIntegrationTests.applyPrices(harness)
        try harness.tally(["customers", "set", "cust-0", "--low-balance", "30,10"])
        let events = AggregatorHarness.events(count: 12_000, seed: 71, customers: 40)
        var stream: [(key: String, value: [UInt8])] = (0..<40).map { RaterIntegrationTests.grant("g-\($0)", customer: "cust-\($0)", amount: "20") }
        for (index, event) in events.enumerated() {
            stream.append((event.subject, EventEncoder.encode(event)))
            if index % 30 == 0 { stream.append((event.subject, EventEncoder.encode(event))) }
        }
        stream.append(("cust-3", Array("not an event".utf8)))
        try await harness.publish(stream)
        // Each consumer in its own group, as in production (the harness's group is the rater's);
        // they keep running while the tests replay.
        let rater = try harness.startRater()
        let aggregator = try harness.startAggregator(["--group", Self.aggregatorGroup(harness)])
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        XCTAssertTrue(try harness.waitUntilConsumed(group: Self.aggregatorGroup(harness)), aggregator.log)
        return (harness, events)
    }

    static func aggregatorGroup(_ harness: AggregatorHarness) -> String { harness.group + "-aggregator" }

    func replay(_ harness: AggregatorHarness, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let consumer = arguments[arguments.firstIndex(of: "--consumer")! + 1]
        let live = consumer == "rater" ? harness.group : Self.aggregatorGroup(harness)
        return try harness.tallyStatus(["replay", "--topic", harness.topic, "--live-group", live, "--dry-run"] + arguments)
    }

    /// Unchanged pricing: zero differences and equal checksums, for both consumers; exit 0.
    func testReplayWithUnchangedPricingRebuildsTheSameState() async throws {
        let (harness, _) = try await preparedHarness()
        for consumer in ["rater", "aggregator"] {
            let (status, output) = try replay(harness, ["--consumer", consumer])
            XCTAssertEqual(status, 0, output)
            XCTAssertTrue(output.contains("identical: the replay rebuilt the live state exactly"), output)
            XCTAssertFalse(output.contains(" NO\n"), output)
            XCTAssertTrue(output.contains("replayed "), "progress and a summary are shown\n\(output)")
        }
        // --dry-run dropped the shadow schemas.
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tally_replay_%'").scalar, "0")
        let checksum = try harness.tally(["checksum", "--consumer", "rater", "--group", harness.group])
        XCTAssertTrue(checksum.contains("wallet_ledger"), checksum)
    }

    /// One model's price changes for the replay only: the report shows exactly the changed charges,
    /// equal to an independent calculation, and the live catalog and state are untouched; exit 1.
    func testReplayAfterAPriceChangeShowsExactlyTheChangedCharges() async throws {
        let (harness, events) = try await preparedHarness()
        let liveBefore = try harness.tally(["checksum", "--consumer", "rater", "--group", harness.group])
        let file = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("new-prices") + ".yaml")
        try RaterIntegrationTests.priceBook.replacingOccurrences(of: #"model: gpt-4o, input: "2.50", output: "10.00""#,
                                                                 with: #"model: gpt-4o, input: "2.50", output: "12.00""#)
            .write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        let (status, output) = try replay(harness, ["--consumer", "rater", "--pricing", file.path, "--format", "json"])
        XCTAssertEqual(status, 1, "differences exit 1\n\(output)")
        // Standard error follows the report in the output: the --dry-run line.
        var json = String(output[output.range(of: "{\"shadow_schema\"")!.lowerBound...])
        if let end = json.range(of: "\ndropped ") { json = String(json[..<end.lowerBound]) }
        guard case .object(let report) = try JSONValue.parse(Array(json.utf8)).get(),
              case .array(let differences) = report["differences"]! else { return XCTFail(json) }
        // Independent: per customer, gpt-4o output tokens × 2.00 per 1M, each side rounded once.
        var outputTokens: [String: Int64] = [:]
        var seen = Set<String>()
        for event in events where event.model == "gpt-4o" && seen.insert(event.subject + "/" + event.id).inserted {
            outputTokens[event.subject, default: 0] += event.outputTokens
        }
        var amountChanges: [String: Int64] = [:]
        for case .object(let difference) in differences {
            guard difference["measure"]?.string == "amount_nanos" else { continue }
            XCTAssertTrue(difference["item"]?.string?.hasSuffix(" gpt-4o output") ?? false, "only gpt-4o output changes: \(difference)")
            guard case .integer(.value(let change)) = difference["difference"]! else { return XCTFail() }
            amountChanges[difference["customer_id"]!.string!] = change
        }
        func charge(_ tokens: Int64, _ nanosPerMillion: Int64) -> Int64 { (tokens * nanosPerMillion + 500_000) / 1_000_000 }
        let expected = outputTokens.filter { $0.value > 0 }.mapValues { charge($0, 12_000_000_000) - charge($0, 10_000_000_000) }
        XCTAssertEqual(amountChanges, expected)
        XCTAssertEqual(try harness.tally(["pricing", "list"]).components(separatedBy: "\n").filter { $0.hasPrefix("default") }.count, 1,
                       "the live catalog keeps one version")
        XCTAssertEqual(try harness.tally(["checksum", "--consumer", "rater", "--group", harness.group]), liveBefore, "live state untouched")
    }

    /// A partition subset: only the customers of that partition appear, in the report and in the shadow.
    func testReplayOfOnePartitionTouchesOnlyItsCustomers() async throws {
        let (harness, _) = try await preparedHarness()
        let (status, output) = try harness.tallyStatus(["replay", "--topic", harness.topic, "--live-group", harness.group,
                                                        "--consumer", "rater", "--partitions", "2"])
        XCTAssertEqual(status, 0, output)
        let schema = try XCTUnwrap(try harness.connection.query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tally_replay_rater_%'").scalar)
        let partitionCustomers = Set(try harness.connection.query("SELECT DISTINCT customer_id FROM tally.rater_event_keys WHERE partition = 2").rows.map { $0[0]! })
        let shadowCustomers = Set(try harness.connection.query("SELECT DISTINCT customer_id FROM \(schema).wallets").rows.map { $0[0]! })
        XCTAssertFalse(partitionCustomers.isEmpty)
        XCTAssertEqual(shadowCustomers, partitionCustomers)
        XCTAssertEqual(try harness.connection.query("SELECT array_agg(DISTINCT partition) FROM \(schema).wallet_ledger").scalar, "{2}")
        XCTAssertEqual(try harness.connection.query("SELECT array_agg(partition) FROM \(schema).consumer_offsets").scalar, "{2}")
    }

    /// Reconcile recounts the topic: everything matches, until a window row and a rated total are changed by hand.
    func testReconcileDetectsRowsChangedByHand() async throws {
        let (harness, _) = try await preparedHarness()
        let groups = ["--topic", harness.topic, "--aggregator-group", Self.aggregatorGroup(harness), "--rater-group", harness.group]
        let clean = try harness.tallyStatus(["reconcile"] + groups)
        XCTAssertEqual(clean.status, 0, clean.output)
        XCTAssertTrue(clean.output.contains(", 0 mismatches"), clean.output)
        let changed = try harness.connection.query("""
            UPDATE tally.usage_windows_hourly SET output_tokens = output_tokens + 7
            WHERE ctid = (SELECT ctid FROM tally.usage_windows_hourly WHERE customer_id = 'cust-5' ORDER BY window_start LIMIT 1)
            RETURNING to_char(window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            """).scalar
        try harness.connection.query("""
            UPDATE tally.rated_usage SET quantity = quantity - 1
            WHERE ctid = (SELECT ctid FROM tally.rated_usage WHERE customer_id = 'cust-9' LIMIT 1)
            """)
        let broken = try harness.tallyStatus(["reconcile"] + groups)
        XCTAssertEqual(broken.status, 1, broken.output)
        XCTAssertTrue(broken.output.contains("usage_windows_hourly  cust-5 \(try XCTUnwrap(changed))"), broken.output)
        XCTAssertTrue(broken.output.contains("rated_usage           cust-9 "), broken.output)
        XCTAssertTrue(broken.output.contains(", 2 mismatches"), broken.output)
        let other = try harness.tallyStatus(["reconcile", "--customer", "cust-12"] + groups)
        XCTAssertEqual(other.status, 0, "other customers still match\n\(other.output)")
    }

    /// Promote a replay with new prices while events keep arriving: afterwards the live state is
    /// exact (reconcile recounts it from the topic at the new prices), a second replay finds nothing
    /// to change, and the partitions not replayed keep their rows byte for byte.
    func testPromoteWhileEventsKeepArrivingLeavesAnExactState() async throws {
        let harness = try AggregatorHarness()
        try RaterIntegrationTests.applyPrices(harness)
        let events = AggregatorHarness.events(count: 6_000, seed: 81, customers: 30)
        try await harness.publish((0..<30).map { RaterIntegrationTests.grant("g-\($0)", customer: "cust-\($0)", amount: "15") }
                                  + events.map { ($0.subject, EventEncoder.encode($0)) })
        let live = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), live.log)
        // The rows that exist now on the other partitions (events keep arriving there too).
        let bound = try harness.storedOffsets()
        let otherPartitions = """
            SELECT partition, count(*), md5(string_agg(to_jsonb(l)::text, '|' ORDER BY partition, record_offset, seq)) FROM tally.wallet_ledger l
            WHERE partition <> 1 AND record_offset < (ARRAY[\((0..<4).map { String(bound[Int32($0)] ?? 0) }.joined(separator: ","))])[partition + 1]
            GROUP BY 1 ORDER BY 1
            """
        let othersBefore = try harness.connection.query(otherPartitions).rows

        // Events keep arriving during the replay and the handover.
        let arriving = Task {
            for round in 0..<30 {
                try await harness.publish(AggregatorHarness.events(count: 100, seed: 900 + UInt64(round), customers: 30, prefix: "during-\(round)")
                    .map { ($0.subject, EventEncoder.encode($0)) })
                try await Task.sleep(for: .milliseconds(250))
            }
        }
        let file = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("new-prices") + ".yaml")
        try RaterIntegrationTests.priceBook.replacingOccurrences(of: #"output: "10.00""#, with: #"output: "12.00""#)
            .write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        let (status, output) = try harness.tallyStatus(["replay", "--consumer", "rater", "--topic", harness.topic, "--live-group", harness.group,
                                                        "--partitions", "1", "--pricing", file.path, "--promote"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("promoted tally_replay_rater_"), output)
        try await arriving.value
        XCTAssertTrue(try harness.waitUntilConsumed(), live.log)

        XCTAssertEqual(try harness.connection.query(otherPartitions).rows, othersBefore, "partitions not replayed keep their rows")
        let onPartitionOne = "SELECT DISTINCT customer_id FROM tally.rater_event_keys WHERE partition = 1"
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.rated_usage WHERE book_version = 1 AND customer_id IN (\(onPartitionOne))").scalar, "0",
                       "partition 1's customers are rated with the new version only")
        XCTAssertGreaterThan(Int(try harness.connection.query("SELECT count(*) FROM tally.rated_usage WHERE book_version = 1").scalar ?? "0") ?? 0, 0,
                             "the other partitions' customers keep the version they were rated with until they are replayed")
        let reconcile = try harness.tallyStatus(["reconcile", "--topic", harness.topic, "--rater-group", harness.group, "--partition", "1",
                                                 "--aggregator-group", "none"])
        XCTAssertEqual(reconcile.status, 0, "partition 1 is exact at the new prices\n\(reconcile.output)\n\(live.log)")
        let again = try harness.tallyStatus(["replay", "--consumer", "rater", "--topic", harness.topic, "--live-group", harness.group,
                                             "--partitions", "1", "--dry-run"])
        XCTAssertEqual(again.status, 0, "a second replay finds nothing to change\n\(again.output)")
        live.signal(SIGTERM)
        XCTAssertEqual(live.wait(timeout: .seconds(30)), 0, live.log)
    }

    /// A rater batch whose commit waited behind a promote's handover lands after it, so it is
    /// rated with the price books the promote added: the rater reads the catalog once its offset
    /// rows are locked. Here a transaction stands in for the promote (it holds the live group's
    /// offset rows, the new version is applied meanwhile, and it bumps `state_version` as a
    /// promote does), so the interleaving that made the promote test intermittent happens every time.
    func testABatchCommittedBehindAPromoteIsRatedWithItsPriceBooks() async throws {
        let harness = try AggregatorHarness()
        try RaterIntegrationTests.applyPrices(harness)
        try await harness.publish(AggregatorHarness.events(count: 300, seed: 7, customers: 6).map { ($0.subject, EventEncoder.encode($0)) })
        let live = try harness.startRater()
        XCTAssertTrue(try harness.waitUntilConsumed(), live.log)
        let versionOneRows = "SELECT md5(string_agg(to_jsonb(r)::text, '|' ORDER BY customer_id, period_start, model, token_type)) FROM tally.rated_usage r WHERE book_version = 1"
        let versionOneBefore = try harness.connection.query(versionOneRows).scalar

        let handover = try PostgresConnection(url: harness.databaseURL, logger: TestStack.logger)
        let handoverPID = try handover.query("SELECT pg_backend_pid()").scalar
        try handover.query("BEGIN")
        try handover.query("SELECT 1 FROM tally.consumer_offsets WHERE consumer_group = $1 FOR UPDATE", [harness.group])
        let behind = AggregatorHarness.events(count: 60, seed: 8, customers: 6, prefix: "behind")
        try await harness.publish(behind.map { ($0.subject, EventEncoder.encode($0)) })
        // The rater has prepared a batch and waits for the offset rows.
        let deadline = ContinuousClock.now + .seconds(60)
        var waiting = false
        while !waiting && ContinuousClock.now < deadline {
            waiting = try harness.connection.query("""
                SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
                  AND pid::text <> $1 AND query LIKE '%UPDATE consumer_offsets%'
                """, [handoverPID]).scalar != "0"
            if !waiting { try await Task.sleep(for: .milliseconds(50)) }
        }
        XCTAssertTrue(waiting, "the rater's commit waits for the offset rows\n\(live.log)")
        let file = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("new-prices") + ".yaml")
        try RaterIntegrationTests.priceBook.replacingOccurrences(of: #"output: "10.00""#, with: #"output: "12.00""#)
            .write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        XCTAssertTrue(try harness.tally(["pricing", "apply", file.path]).contains("applied default version 2"))
        try handover.query("UPDATE tally.consumer_offsets SET state_version = state_version + 1 WHERE consumer_group = $1", [harness.group])
        try handover.query("COMMIT")
        XCTAssertTrue(try harness.waitUntilConsumed(), live.log)

        XCTAssertEqual(try harness.connection.query(versionOneRows).scalar, versionOneBefore, "no usage that came after the handover is rated with version 1")
        // Every (customer, model) of the later events that the book prices has a version-2 row.
        let priced = Set(RaterIntegrationTests.priceBook.split(separator: "\n").compactMap { line -> String? in
            guard let start = line.range(of: "model: ") else { return nil }
            return String(line[start.upperBound...].prefix { $0 != "," })
        })
        let expected = Set(behind.filter { priced.contains($0.model) }.map { "\($0.subject) \($0.model)" })
        XCTAssertFalse(expected.isEmpty)
        let versionTwo = Set(try harness.connection.query("SELECT DISTINCT customer_id || ' ' || model FROM tally.rated_usage WHERE book_version = 2")
            .rows.compactMap { $0[0] })
        XCTAssertEqual(versionTwo, expected)
        live.signal(SIGTERM)
        XCTAssertEqual(live.wait(timeout: .seconds(30)), 0, live.log)
    }

    /// A log that lost records the aggregator had counted (here: the broker comes back on storage
    /// that holds the same records but the last 40): `tally check-log` names each partition and
    /// changes nothing; `--keep` keeps what was counted and counts what comes next exactly once;
    /// `replay --promote` rebuilds the state from what the log holds even though the live group
    /// stands past its end.
    func testALogThatLostCountedRecordsIsFoundAndEitherChoiceIsExact() async throws {
        let harness = try AggregatorHarness()
        let kept = AggregatorHarness.events(count: 600, seed: 17, customers: 12)
        let lost = AggregatorHarness.events(count: 40, seed: 18, customers: 12, prefix: "lost")
        try await harness.publish(kept)
        try await harness.publish(lost)
        let counted = harness.logEnd
        let first = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), first.log)
        first.signal(SIGTERM)
        XCTAssertEqual(first.wait(timeout: .seconds(30)), 0, first.log)

        // The same records in the same order, without the last 40; PostgreSQL as the consumer left it.
        let oldTopic = harness.topic
        try harness.moveToNewTopic()
        try await harness.publish(kept)
        let survived = harness.logEnd
        try harness.connection.query("UPDATE tally.consumer_offsets SET topic = $1 WHERE topic = $2", [harness.topic, oldTopic])
        try harness.connection.query("UPDATE tally.topic_layouts SET topic = $1 WHERE topic = $2", [harness.topic, oldTopic])
        let shortened = counted.keys.filter { counted[$0]! > survived[$0] ?? 0 }.sorted()
        XCTAssertEqual(shortened.reduce(0) { $0 + counted[$1]! - (survived[$1] ?? 0) }, 40)

        let check = try harness.tallyStatus(["check-log", "--topic", harness.topic])
        XCTAssertEqual(check.status, 1, check.output)
        for partition in shortened {
            XCTAssertTrue(check.output.contains("group \(harness.group), partition \(partition): counted up to offset \(counted[partition]!), the log ends at \(survived[partition] ?? 0)"),
                          check.output)
        }
        XCTAssertTrue(check.output.contains("tally replay --consumer aggregator|rater --live-group \(harness.group) --promote") && check.output.contains("tally check-log --keep"),
                      check.output)
        XCTAssertEqual(try harness.storedOffsets(), counted, "checking changes nothing")

        // A consumer started on the shortened log does not read those partitions, even once new
        // events take the log past the offsets it stored: it records where the log ended.
        let running = try harness.startAggregator()
        XCTAssertTrue(try TestStack.eventually {
            try harness.connection.query("SELECT count(*) FROM tally.log_gaps WHERE topic = $1", [harness.topic]).scalar == String(shortened.count)
        }, running.log)
        let gapEnds = try harness.connection.query("SELECT partition, log_end FROM tally.log_gaps WHERE topic = $1 ORDER BY 1", [harness.topic]).rows
        XCTAssertEqual(gapEnds, shortened.map { [String($0), String(survived[$0] ?? 0)] })
        let early = AggregatorHarness.events(count: 200, seed: 20, customers: 12, prefix: "early")
        try await harness.publish(early)
        try await Task.sleep(for: .seconds(3))
        running.signal(SIGTERM)
        XCTAssertEqual(running.wait(timeout: .seconds(30)), 0, running.log)
        for partition in shortened { XCTAssertEqual(try harness.storedOffsets()[partition], counted[partition], "partition \(partition) was not read") }
        let stalled = try harness.tallyStatus(["check-log", "--topic", harness.topic])
        XCTAssertEqual(stalled.status, 1, stalled.output)
        for partition in shortened {
            XCTAssertTrue(stalled.output.contains("group \(harness.group), partition \(partition): counted up to offset \(counted[partition]!); its consumer found the log ending at \(survived[partition] ?? 0)"),
                          stalled.output)
        }

        // Keep: what was counted stays; counting goes on from where the log ended, so the early
        // events count, and new ones and a producer's re-send of ten lost ones count once.
        let kept2 = try harness.tallyStatus(["check-log", "--topic", harness.topic, "--keep"])
        XCTAssertEqual(kept2.status, 0, kept2.output)
        for partition in shortened { XCTAssertEqual(try harness.storedOffsets()[partition], survived[partition] ?? 0) }
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.log_gaps").scalar, "0")
        let after = AggregatorHarness.events(count: 100, seed: 19, customers: 12, prefix: "after")
        try await harness.publish(after + lost.prefix(10))
        let second = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), second.log)
        try harness.assertTotals(equal: AggregatorHarness.recount(kept + lost + early + after))
        XCTAssertEqual(try harness.tallyStatus(["check-log", "--topic", harness.topic]).status, 0)
        second.signal(SIGTERM)
        XCTAssertEqual(second.wait(timeout: .seconds(30)), 0, second.log)

        // Rebuild: PostgreSQL says partition 1 was counted 3 records further than the log goes; the
        // replay rebuilds every partition from what the log holds, lost records gone.
        try harness.connection.query("UPDATE tally.consumer_offsets SET next_offset = next_offset + 3 WHERE topic = $1 AND partition = 1", [harness.topic])
        let rebuild = try harness.tallyStatus(["replay", "--consumer", "aggregator", "--topic", harness.topic, "--live-group", harness.group, "--promote"])
        XCTAssertEqual(rebuild.status, 0, rebuild.output)
        XCTAssertTrue(rebuild.output.contains("stood past the log end on partitions [1]"), rebuild.output)
        XCTAssertEqual(try harness.storedOffsets().filter { $0.value > 0 }, harness.logEnd.filter { $0.value > 0 })
        try harness.assertTotals(equal: AggregatorHarness.recount(kept + early + after + lost.prefix(10)))
        let reconcile = try harness.tallyStatus(["reconcile", "--topic", harness.topic, "--aggregator-group", harness.group, "--rater-group", "none"])
        XCTAssertEqual(reconcile.status, 0, reconcile.output)
    }

    /// The dashboard views over a known dataset, checked against the test's own recount.
    func testDashboardViewsMatchTheDataset() async throws {
        let (harness, events) = try await preparedHarness()
        var seen = Set<String>()
        let distinct = events.filter { seen.insert($0.subject + "/" + $0.id).inserted }
        // Usage per customer, model and day.
        var daily: [String: Int64] = [:]
        for event in distinct { daily["\(event.subject)|\(event.model)|\(event.time.text.prefix(10))", default: 0] += event.inputTokens + event.outputTokens }
        let usage = try harness.connection.query("SELECT customer_id, model, day::text, total_tokens FROM tally.dashboard_usage_daily")
        var stored: [String: Int64] = [:]
        for row in 0..<usage.rowCount { stored["\(usage.string(row, 0)!)|\(usage.string(row, 1)!)|\(usage.string(row, 2)!)"] = try usage.int64(row, 3)! }
        XCTAssertEqual(stored, daily)
        // Top customer by tokens.
        var perCustomer: [String: Int64] = [:]
        for event in distinct { perCustomer[event.subject, default: 0] += event.inputTokens + event.outputTokens }
        let top = perCustomer.max { $0.value < $1.value }!
        XCTAssertEqual(try harness.connection.query("SELECT customer_id, total_tokens FROM tally.dashboard_top_customers WHERE rank = 1").rows,
                       [[top.key, String(top.value)]])
        // Revenue per model: the independent charges, summed per model.
        var revenue: [String: Int64] = [:]
        for model in RaterIntegrationTests.rates.keys {
            revenue[model] = RaterIntegrationTests.expectedCharges(distinct.filter { $0.model == model }).values.reduce(0) { $0 + $1.values.reduce(0, +) }
        }
        let models = try harness.connection.query("SELECT model, (revenue * 1000000000)::bigint FROM tally.dashboard_model_revenue")
        var storedRevenue: [String: Int64] = [:]
        for row in 0..<models.rowCount { storedRevenue[models.string(row, 0)!] = try models.int64(row, 1)! }
        XCTAssertEqual(storedRevenue, revenue.filter { $0.value > 0 })
        // cust-0: thresholds 30 and 10, a 20.00 grant: below its threshold.
        XCTAssertEqual(try harness.connection.query("SELECT threshold::text, below_threshold FROM tally.dashboard_wallets WHERE customer_id = 'cust-0'").rows,
                       [["30.0000000000000000", "t"]])
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.dashboard_wallets WHERE below_threshold AND customer_id <> 'cust-0'").scalar, "0",
                       "customers without thresholds are never below one")
        // Unpriced usage (amazon.nova-pro-v1 has no price), per day and customer, recounted here.
        var unpriced: [String: (events: Int64, input: Int64)] = [:]
        for event in distinct where event.model == "amazon.nova-pro-v1" {
            let key = "\(event.time.text.prefix(10))|\(event.subject)"
            unpriced[key] = ((unpriced[key]?.events ?? 0) + 1, (unpriced[key]?.input ?? 0) + event.inputTokens)
        }
        XCTAssertFalse(unpriced.isEmpty)
        let unpricedRows = try harness.connection.query("SELECT day::text, customer_id, model, events, input_tokens FROM tally.dashboard_unpriced_usage")
        var storedUnpriced: [String: (events: Int64, input: Int64)] = [:]
        for row in 0..<unpricedRows.rowCount {
            XCTAssertEqual(unpricedRows.string(row, 2), "amazon.nova-pro-v1")
            storedUnpriced["\(unpricedRows.string(row, 0)!)|\(unpricedRows.string(row, 1)!)"] = (try unpricedRows.int64(row, 3)!, try unpricedRows.int64(row, 4)!)
        }
        XCTAssertEqual(storedUnpriced.mapValues { "\($0.events)/\($0.input)" }, unpriced.mapValues { "\($0.events)/\($0.input)" })
        // The poison record, once per consumer group.
        XCTAssertEqual(try harness.connection.query("SELECT sum(records) FROM tally.dashboard_rejections WHERE kind = 'dead_letter' AND reason = 'malformed_json'").scalar, "2")
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.dashboard_consumer_positions WHERE topic = $1 AND seconds_since_commit >= 0", [harness.topic]).scalar, "8")
        // Ingest-to-window latency: every record the aggregator committed, with a non-negative latency.
        let latency = try harness.connection.query("""
            SELECT sum(records), bool_and(min_latency_seconds >= 0 AND max_latency_seconds >= min_latency_seconds)
            FROM tally.dashboard_ingest_latency WHERE consumer_group = $1
            """, [Self.aggregatorGroup(harness)]).rows
        XCTAssertEqual(latency, [[String(harness.logEnd.values.reduce(0, +)), "t"]])
    }

    /// The HTML report of a customer's period carries the right totals: tokens and calls recounted
    /// here, spend and closing balance from the independent charges.
    func testUsageReportNumbers() async throws {
        let (harness, events) = try await preparedHarness()
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("reports")).path
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let output = try harness.tally(["report", "--customer", "cust-1", "--period", "2026-11", "--output-dir", folder])
        let html = try String(contentsOfFile: folder + "/report-cust-1-2026-11.html", encoding: .utf8)
        var seen = Set<String>()
        let mine = events.filter { $0.subject == "cust-1" && seen.insert($0.id).inserted }
        let charges = RaterIntegrationTests.expectedCharges(mine)["cust-1"]!["2026-11"]!
        let usd = Currency("USD")!
        XCTAssertTrue(html.contains(#"id="total-tokens">\#(mine.reduce(0) { $0 + $1.totalTokens })<"#), output)
        XCTAssertTrue(html.contains(#"id="total-events">\#(mine.count)<"#))
        XCTAssertTrue(html.contains(#"id="total-spend">\#(usd.format(charges)) USD<"#), "spend")
        XCTAssertTrue(html.contains(#"id="closing-balance">\#(usd.format(20_000_000_000 - charges)) USD<"#), "a 20.00 grant minus the charges")
        XCTAssertEqual(html.components(separatedBy: "<svg").count - 1, 3, "three charts")
        XCTAssertEqual(html.components(separatedBy: "<tr><td>2026-11-").count - 1, 30, "a row per day of the period")
    }
}
