import Foundation
import TallyCore
import TallyKafka
import XCTest

/// The real tally-aggregator against the real broker and PostgreSQL.
final class AggregatorIntegrationTests: XCTestCase {
    /// An ops address already in use ends a consumer with an error naming it before it claims
    /// any partition: no offset row of its group, no epoch bumped, no rebalance caused.
    func testAnOpsAddressInUseEndsTheConsumerBeforeItClaims() async throws {
        let harness = try AggregatorHarness()
        try await harness.publish(AggregatorHarness.events(count: 50, seed: 3))
        let first = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), first.log)
        let port = try XCTUnwrap(first.opsPort, first.log)
        let second = try harness.startAggregator(["--group", harness.group + "-second", "--ops-address", "127.0.0.1:\(port)"])
        XCTAssertNotNil(second.wait(timeout: .seconds(30)), "it ends on its own\n\(second.log)")
        XCTAssertNotEqual(second.wait(timeout: .zero), 0, second.log)
        XCTAssertTrue(second.log.contains("ops HTTP server: bind 127.0.0.1:\(port)"), second.log)
        XCTAssertFalse(second.log.contains("assigned partitions"), second.log)
        XCTAssertEqual(try harness.storedOffsets(group: harness.group + "-second"), [:])
        first.signal(SIGTERM)
        XCTAssertEqual(first.wait(timeout: .seconds(30)), 0, first.log)
    }

    /// Duplicates in one batch, at later offsets and re-sent after a restart, plus conflicts:
    /// windows equal a recount of the distinct events; conflicts are recorded, first by offset wins.
    func testDuplicatesAndConflictsAreCountedOnce() async throws {
        let harness = try AggregatorHarness()
        let events = AggregatorHarness.events(count: 3000, seed: 11)
        // Same batch: each of the first 200 events twice in a row; later offsets: 300 re-sent at the end.
        var stream: [UsageEvent] = []
        for (index, event) in events.enumerated() {
            stream.append(event)
            if index < 200 { stream.append(event) }
        }
        stream += events[1000..<1300]
        // Conflicts: same ids as 50 counted events, other token counts.
        let conflicting = events[2000..<2050].map { event -> UsageEvent in
            var changed = event
            changed.inputTokens += 1
            return changed
        }
        try await harness.publish(stream + conflicting)
        let first = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), "consumed to the log end\n\(first.log)")
        first.signal(SIGTERM)
        XCTAssertEqual(first.wait(timeout: .seconds(30)), 0, "SIGTERM exits 0\n\(first.log)")

        // Re-sent after a restart: 500 old events again, plus 100 new ones.
        let more = AggregatorHarness.events(count: 100, seed: 12, prefix: "late")
        try await harness.publish(Array(events[0..<500]) + more)
        let second = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), "consumed after restart\n\(second.log)")

        try harness.assertTotals(equal: AggregatorHarness.recount(events + more))

        // The ops endpoint: live, ready, and Prometheus metrics that match what happened.
        let port = try XCTUnwrap(second.opsPort, second.log)
        XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/livez").status, 200)
        XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/readyz").status, 200)
        let metrics = try MetricsScrape.waiting(port: port) { $0.sample("tally_aggregator_events_accepted_total") == 100 }
        XCTAssertEqual(metrics.sample("tally_aggregator_events_accepted_total"), 100, "the restarted instance counted the 100 new events\n\(metrics.text)")
        XCTAssertEqual(metrics.sample("tally_aggregator_duplicates_total"), 500)
        XCTAssertTrue(metrics.text.contains("tally_aggregator_lag_records{partition="), metrics.text)
        XCTAssertGreaterThan(metrics.sample("tally_aggregator_transaction_seconds_count") ?? 0, 0, "transactions are timed")
        XCTAssertFalse(metrics.text.contains("cust-"), "no customer id in any label")
        let conflicts = try harness.connection.query("SELECT count(*), count(DISTINCT event_id) FROM tally.event_conflicts").rows[0]
        XCTAssertEqual(conflicts, ["50", "50"])
        let keys = try harness.connection.query("SELECT count(*) FROM tally.usage_event_keys").scalar
        XCTAssertEqual(keys, String(events.count + more.count))
        second.signal(SIGTERM)
        XCTAssertEqual(second.wait(timeout: .seconds(30)), 0)
        XCTAssertTrue(second.log.contains("duplicates="), "progress is logged")
    }

    /// Issue #20: CloudEvents identity. Id 1 from app://chat (100 tokens) and id 1 from app://search
    /// (200 tokens) for one customer are two events: 300 tokens. A key stored before identities had
    /// sources (migration 0014 marks it chr(1)) still stands for its id from any source, in every
    /// batch: a re-send after the upgrade is a duplicate, never counted twice.
    func testTheSameIdFromTwoSourcesIsTwoEventsAndOldKeysStillHold() async throws {
        let harness = try AggregatorHarness(partitions: 2)
        let time = EventTime("2026-11-30T10:00:00Z")!
        func event(_ id: String, _ source: String, _ input: Int64, customer: String = "ce-acme") -> UsageEvent {
            UsageEvent(id: id, source: source, subject: customer, time: time, model: "gpt-4o", inputTokens: input, outputTokens: 0)
        }
        // A key as an upgraded deployment holds it: the old event's id, no source.
        let old = event("legacy-7", "app://before-upgrade", 50)
        try harness.connection.query("""
            INSERT INTO tally.usage_event_keys (customer_id, event_id, event_source, content_hash, partition, record_offset)
            VALUES ($1, $2, chr(1), $3, 0, 0)
            """, [old.subject, old.id, ContentHash.signed(ContentHash.of(old))])
        try await harness.publish([event("1", "app://chat", 100), event("1", "app://search", 200), event("1", "app://search", 200), old])
        let aggregator = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        // A later batch, once the instance's cache has warmed: the old key still answers.
        var changed = old
        changed.source = "app://after-upgrade"
        try await harness.publish([changed, event("2", "app://chat", 5)])
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        // 100 + 200 + 5 tokens, three events; the old event's copies add nothing.
        try harness.assertTotals(equal: ["ce-acme": [305, 0, 0, 0, 0, 305, 3]])
        let input = try harness.connection.query("SELECT sum(input_tokens)::bigint FROM tally.usage_hourly WHERE customer_id = 'ce-acme'").int64(0, 0)
        XCTAssertEqual(input, 305)
        let conflicts = try harness.connection.query("SELECT event_id, event_source FROM tally.event_conflicts").rows
        XCTAssertEqual(conflicts, [["legacy-7", "app://after-upgrade"]], "the old key answers for the new source; other content: a conflict, recorded")
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0)

        // tally backfill-key-sources gives an old key its record's source: the key of id 1 from
        // app://chat, as a pre-0014 deployment holds it, gets app://chat back. legacy-7's key points
        // at another event's record (written by hand above), so it keeps standing for any source.
        try harness.connection.query("UPDATE tally.usage_event_keys SET event_source = chr(1) WHERE event_id = '1' AND event_source = 'app://chat'")
        let output = try harness.tally(["backfill-key-sources", "--topic", harness.topic])
        XCTAssertTrue(output.contains("usage_event_keys: 1 filled in"), output)
        XCTAssertEqual(try harness.connection.query("""
            SELECT event_id, event_source = chr(1) FROM tally.usage_event_keys WHERE customer_id = 'ce-acme' ORDER BY 1, 2
            """).rows, [["1", "f"], ["1", "f"], ["2", "f"], ["legacy-7", "t"]])
    }

    /// Review of #20: a topic's layout is recorded, and a process placing records otherwise does not
    /// start: an upgraded deployment whose log was written with CRC32 (migration 0014 records that),
    /// or a topic whose partition count changed, would split customers between partitions.
    func testAConsumerRefusesATopicPlacedOtherwise() async throws {
        let harness = try AggregatorHarness(partitions: 4)
        try harness.connection.query("INSERT INTO tally.topic_layouts (topic, partitioner, partitions, dedup_horizon_days) VALUES ($1, 'crc32', 4, 36500)", [harness.topic])
        let murmur = try harness.startAggregator()
        XCTAssertEqual(murmur.wait(timeout: .seconds(60)), 1, murmur.log)
        XCTAssertTrue(murmur.log.contains("was written with the crc32 partitioner"), murmur.log)
        let crc = try harness.startAggregator(["--partitioner", "crc32", "--exit-when-caught-up"])
        XCTAssertEqual(crc.wait(timeout: .seconds(60)), 0, "the recorded partitioner: consumed\n\(crc.log)")
        try harness.connection.query("UPDATE tally.topic_layouts SET partitions = 2 WHERE topic = $1", [harness.topic])
        let grown = try harness.startAggregator(["--partitioner", "crc32"])
        XCTAssertEqual(grown.wait(timeout: .seconds(60)), 1, grown.log)
        XCTAssertTrue(grown.log.contains("has 4 partitions, but its records were placed for 2"), grown.log)
        // A new topic is recorded by the first process that uses it.
        let fresh = try AggregatorHarness(partitions: 2)
        let first = try fresh.startAggregator(["--exit-when-caught-up"])
        XCTAssertEqual(first.wait(timeout: .seconds(60)), 0, first.log)
        XCTAssertEqual(try fresh.connection.query("SELECT partitioner, partitions FROM tally.topic_layouts WHERE topic = $1", [fresh.topic]).rows,
                       [["murmur2", "2"]])
    }

    /// An event re-sent on another partition than its customer's (a producer hashing keys another
    /// way) is set aside as `wrong_partition` with its reason, never counted twice, while the copy on
    /// the customer's own partition counts once; two commit lanes, so the copies meet no shared cache.
    func testTheSameEventOnAnotherPartitionIsSetAsideNotCounted() async throws {
        let harness = try AggregatorHarness(partitions: 2)
        let warmUp = AggregatorHarness.events(count: 400, seed: 51)
        try await harness.publish(warmUp)
        let aggregator = try harness.startAggregator(["--commit-lanes", "2"])
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        let resent = AggregatorHarness.events(count: 1, seed: 52, prefix: "resent")
        let home = KeyPartitioner.murmur2.partition(of: resent[0].subject.utf8, partitions: 2)
        try await harness.publish(resent)
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        let more = AggregatorHarness.events(count: 50, seed: 53, prefix: "more")
        try await harness.publish(resent, partition: 1 - home)
        try await harness.publish(more)
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        try harness.assertTotals(equal: AggregatorHarness.recount(warmUp + resent + more))
        XCTAssertEqual(try harness.connection.query("SELECT partition FROM tally.usage_event_keys WHERE event_id = $1", [resent[0].id]).rows,
                       [[String(home)]], "the copy on the customer's partition is the one counted")
        let letters = try harness.connection.query("SELECT partition, reason_code, reason FROM tally.dead_letters").rows
        XCTAssertEqual(letters.count, 1)
        XCTAssertEqual(letters.first?[0], String(1 - home))
        XCTAssertEqual(letters.first?[1], "wrong_partition")
        XCTAssertTrue(letters.first?[2]?.contains("customer \(resent[0].subject) belongs on partition \(home) of 2") ?? false, "\(letters)")
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0)
    }

    /// Window deltas folded after nearly every batch, by two lanes, while batches keep appending:
    /// no total changes, and deltas an earlier instance left unfolded are folded too.
    func testFoldingWindowDeltasChangesNoTotal() async throws {
        let harness = try AggregatorHarness()
        // Left by an instance that died before its next fold: 3 events of a customer of its own.
        try harness.connection.query("""
            INSERT INTO tally.usage_window_deltas VALUES ('cust-earlier', '2026-11-01T10:00:00Z', 'gpt-4o', 'chat', '', '', 30, 20, 0, 0, 0, 50, 3)
            """)
        let events = AggregatorHarness.events(count: 6000, seed: 61)
        try await harness.publish(events + Array(events[100..<400]))
        let aggregator = try harness.startAggregator(["--commit-lanes", "2", "--batch-size", "300", "--window-fold-rows", "100"])
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        var expected = AggregatorHarness.recount(events)
        expected["cust-earlier"] = [30, 20, 0, 0, 0, 50, 3]
        try harness.assertTotals(equal: expected)
        // Idle: everything is folded into the hourly rows.
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(30)) {
            try harness.connection.query("SELECT count(*) FROM tally.usage_window_deltas").scalar == "0"
        }, aggregator.log)
        let windows = Set(events.map { [$0.subject, String($0.time.microseconds / 3_600_000_000), $0.model, $0.feature ?? "", $0.provider ?? "",
                                         $0.environment ?? ""] })
        let folded = try harness.connection.query("SELECT sum(event_count), count(*) FROM tally.usage_windows_hourly").rows[0]
        XCTAssertEqual(folded, [String(events.count + 3), String(windows.count + 1)], "one row per window, every event in it")
        try harness.assertTotals(equal: expected)
        XCTAssertFalse(aggregator.log.contains("folding window deltas failed"), aggregator.log)
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0)
    }

    /// Issue #19: 1,100 events of 2^53 - 1 input tokens for one customer in one hour, over many
    /// batches and folds. The window's sum passes bigint: folds keep working for everyone, and
    /// `tally usage` and `tally checksum` read the exact sum.
    func testWindowSumsPastBigintFoldAndRead() async throws {
        let harness = try AggregatorHarness()
        let largest: Int64 = 9_007_199_254_740_991
        let huge = (0..<1_100).map { index in
            UsageEvent(id: "huge-\(index)", source: "t", subject: "mallory", time: EventTime("2026-11-02T10:00:00Z")!, model: "gpt-4o",
                       inputTokens: largest, outputTokens: 0)
        }
        let others = AggregatorHarness.events(count: 2000, seed: 19)
        try await harness.publish(huge + others)
        let aggregator = try harness.startAggregator(["--batch-size", "250", "--window-fold-rows", "50"])
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(30)) {
            try harness.connection.query("SELECT count(*) FROM tally.usage_window_deltas").scalar == "0"
        }, aggregator.log)
        XCTAssertFalse(aggregator.log.contains("folding window deltas failed"), aggregator.log)
        // 1,100 × 9,007,199,254,740,991, worked out by hand.
        XCTAssertEqual(try harness.connection.query("SELECT input_tokens::text, event_count::text FROM tally.usage_hourly WHERE customer_id = 'mallory'").rows,
                       [["9907919180215090100", "1100"]])
        // Independent: the recount of every event, huge ones included, in 128 bits.
        try harness.assertTotals(equal: AggregatorHarness.recount(huge + others))
        let usage = try harness.tally(["usage", "--customer", "mallory", "--granularity", "month"])
        XCTAssertTrue(usage.contains("9907919180215090100"), usage)
        let checksum = try harness.tally(["checksum", "--consumer", "aggregator"])
        XCTAssertTrue(checksum.contains("usage_windows_hourly"), checksum)
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0)
    }

    /// kill -9 at random moments during a 100k-event stream, restarted each time: exact totals.
    func testKillNineAtRandomMomentsKeepsTotalsExact() async throws {
        let harness = try AggregatorHarness()
        let events = AggregatorHarness.events(count: 100_000, seed: 21, customers: 200)
        var random = SeededGenerator(seed: 99)
        // 5% re-sends spread through the stream.
        let resent = (0..<5000).map { _ in events[Int.random(in: 0..<events.count, using: &random)] }
        var stream = events
        for (index, event) in resent.enumerated() { stream.insert(event, at: min(stream.count, 20 * index + 7)) }
        let producing = Task { try await harness.publish(stream) }
        var kills = 0
        for _ in 0..<4 {
            let instance = try harness.startAggregator()
            // Joining takes ~5 s on Tansu; kill somewhere inside the consuming phase.
            try await Task.sleep(for: .seconds(Double.random(in: 6...9, using: &random)))
            instance.signal(SIGKILL)
            instance.wait()
            kills += 1
        }
        try await producing.value
        let final = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(timeout: .seconds(180)), "consumed after \(kills) kills\n\(final.log)")
        try harness.assertTotals(equal: AggregatorHarness.recount(events))
        final.signal(SIGTERM)
        XCTAssertEqual(final.wait(timeout: .seconds(30)), 0)
    }

    /// PostgreSQL stopped (immediate) mid-stream and started again: the aggregator waits,
    /// reconnects, and finishes with exact totals.
    func testSurvivesAPostgresRestartMidStream() async throws {
        let harness = try AggregatorHarness()
        let events = AggregatorHarness.events(count: 30_000, seed: 61, customers: 80)
        let aggregator = try harness.startAggregator()
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(60)) { aggregator.log.contains("assigned partitions") }, aggregator.log)
        try await harness.publish(Array(events[0..<15_000]))
        try await Task.sleep(for: .seconds(1))
        try TestStack.stack("pg-stop")
        try await harness.publish(Array(events[15_000...]))
        try await Task.sleep(for: .seconds(3))
        XCTAssertNil(aggregator.wait(timeout: .milliseconds(10)), "still running while the database is away")
        try TestStack.stack("pg-start")
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        try harness.assertTotals(equal: AggregatorHarness.recount(events))
        XCTAssertTrue(aggregator.log.contains("retrying"), "it noticed the outage")
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0)
    }

    /// Two instances share the group; one is killed midway; the other takes over: exact totals.
    func testTwoInstancesOneKilledMidway() async throws {
        let harness = try AggregatorHarness()
        let events = AggregatorHarness.events(count: 40_000, seed: 31, customers: 100)
        let a = try harness.startAggregator()
        let b = try harness.startAggregator()
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(60)) { a.log.contains("assigned partitions") && b.log.contains("assigned partitions") },
                      "both instances own partitions\n\(a.log)\n\(b.log)")
        try await harness.publish(Array(events[0..<20_000]))
        try await Task.sleep(for: .seconds(1.5))
        b.signal(SIGKILL)
        b.wait()
        try await harness.publish(Array(events[20_000...]))
        XCTAssertTrue(try harness.waitUntilConsumed(timeout: .seconds(120)), "the survivor finishes\n\(a.log)")
        try harness.assertTotals(equal: AggregatorHarness.recount(events))
        a.signal(SIGTERM)
        XCTAssertEqual(a.wait(timeout: .seconds(30)), 0)
    }

    /// A paused instance (SIGSTOP past its session timeout) loses its partitions; when resumed
    /// (SIGCONT) its in-flight batch is fenced and never committed: totals stay exact.
    func testZombieInstanceCannotCommit() async throws {
        let harness = try AggregatorHarness()
        let events = AggregatorHarness.events(count: 20_000, seed: 41, customers: 60)
        // The zombie pauses 3 s between preparing and committing each batch, so the stop lands mid-batch.
        let zombie = try harness.startAggregator(["--batch-size", "500"], environment: ["TALLY_FAULT_COMMIT_DELAY_MS": "3000"])
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(60)) { zombie.log.contains("assigned partitions") }, zombie.log)
        try await harness.publish(Array(events[0..<10_000]))
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) { zombie.log.contains("\"progress") || (try? harness.storedOffsets().values.reduce(0, +)) ?? 0 > 0 })
        try await Task.sleep(for: .seconds(1))
        zombie.signal(SIGSTOP)
        let successor = try harness.startAggregator()
        try await harness.publish(Array(events[10_000...]))
        XCTAssertTrue(try harness.waitUntilConsumed(timeout: .seconds(120)), "the successor takes over\n\(successor.log)")
        zombie.signal(SIGCONT)
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) { zombie.log.contains("fenced on partitions") },
                      "the resumed zombie's commit is refused\n\(zombie.log)")
        // Let the group settle with both members, then check nothing moved wrongly.
        try await Task.sleep(for: .seconds(8))
        XCTAssertTrue(try harness.waitUntilConsumed(timeout: .seconds(60)))
        try harness.assertTotals(equal: AggregatorHarness.recount(events))
        let epochs = try harness.connection.query("SELECT min(owner_epoch) FROM tally.consumer_offsets").scalar
        XCTAssertGreaterThanOrEqual(Int(epochs ?? "0") ?? 0, 2, "the successor's claim bumped every epoch")
        for process in [zombie, successor] { process.signal(SIGTERM) }
        XCTAssertEqual(successor.wait(timeout: .seconds(30)), 0)
        XCTAssertEqual(zombie.wait(timeout: .seconds(30)), 0)
    }

    /// 1,000 poison records interleaved with valid events: all land in the DLQ topic and
    /// tally.dead_letters with their reason; every valid event is counted.
    func testPoisonRecordsGoToTheDeadLetterQueue() async throws {
        let harness = try AggregatorHarness()
        let events = AggregatorHarness.events(count: 5000, seed: 51)
        let poisonKinds: [(String, [UInt8])] = [
            ("malformed_json", Array("{not json".utf8)),
            ("schema_invalid", Array(#"{"specversion":"1.0","id":"x","source":"s","type":"llm.usage","subject":"c","time":"2026-01-01T00:00:00Z","data":{"model":"m","input_tokens":-5,"output_tokens":1}}"#.utf8)),
            ("unknown_type", Array(#"{"specversion":"1.0","id":"x","source":"s","type":"llm.other","subject":"c","time":"2026-01-01T00:00:00Z","data":{}}"#.utf8)),
            ("malformed_json", [0xff, 0xfe, 0x00, 0x22]),
            // A valid event under another customer's key: it would sit in the wrong partition.
            ("key_mismatch", Array(#"{"specversion":"1.0","id":"x","source":"s","type":"llm.usage","subject":"not-the-key","time":"2026-01-01T00:00:00Z","data":{"model":"m","input_tokens":1,"output_tokens":1}}"#.utf8)),
        ]
        var records: [(key: String, value: [UInt8])] = []
        var poisonCount: [String: Int] = [:]
        for (index, event) in events.enumerated() {
            records.append((event.subject, EventEncoder.encode(event)))
            if index % 5 == 0 && index / 5 < 1000 {
                let (code, value) = poisonKinds[(index / 5) % poisonKinds.count]
                records.append((event.subject, value))
                poisonCount[code, default: 0] += 1
            }
        }
        // One record past the size limit (a megabyte: once is enough).
        records.append((events[0].subject, Array(repeating: UInt8(ascii: "a"), count: EventLimits.maxEventBytes + 1)))
        poisonCount["oversize"] = 1
        try await harness.publish(records)
        let aggregator = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        try harness.assertTotals(equal: AggregatorHarness.recount(events))

        let reasons = try harness.connection.query("SELECT reason_code, count(*) FROM tally.dead_letters GROUP BY 1").rows
        var stored: [String: Int] = [:]
        for row in reasons { stored[row[0]!] = Int(row[1]!)! }
        XCTAssertEqual(stored, poisonCount)
        XCTAssertEqual(stored.values.reduce(0, +), 1001)

        // The DLQ topic holds each poison record once, with its origin in the headers.
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: harness.brokers), groupID: nil, logger: TestStack.logger)
        try consumer.assign(Dictionary(uniqueKeysWithValues: (0..<4).map { (TopicPartition(harness.topic + ".dlq", Int32($0)), KafkaOffset.beginning) }))
        var dead: [ConsumerRecord] = []
        _ = TestStack.eventually(timeout: .seconds(30)) {
            dead += consumer.poll(maxRecords: 1000, timeout: .milliseconds(200))
            return dead.count >= 1001
        }
        XCTAssertEqual(dead.count, 1001)
        let origins = Set(dead.map { "\(String(decoding: $0.header("tally.source.partition") ?? [], as: UTF8.self))/\(String(decoding: $0.header("tally.source.offset") ?? [], as: UTF8.self))" })
        XCTAssertEqual(origins.count, 1001, "one DLQ record per poison record")
        XCTAssertTrue(dead.allSatisfy { $0.header("tally.source.topic").map { String(decoding: $0, as: UTF8.self) } == harness.topic })
        consumer.close()

        // The structured log names dead-lettered records by partition and offset, as JSON fields.
        let storedLetters = Set(try harness.connection.query(
            "SELECT partition || '/' || record_offset || '/' || reason_code FROM tally.dead_letters").rows.map { $0[0]! })
        let logged = aggregator.log.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        XCTAssertTrue(logged.allSatisfy { $0["service"] as? String == "tally-aggregator" && $0["level"] != nil })
        let loggedLetters = logged.filter { $0["msg"] as? String == "dead-lettered a record" }.map {
            "\($0["partition"] as? String ?? "?")/\($0["offset"] as? String ?? "?")/\($0["reason"] as? String ?? "?")"
        }
        XCTAssertFalse(loggedLetters.isEmpty, aggregator.log)
        XCTAssertTrue(Set(loggedLetters).isSubset(of: storedLetters), "\(Set(loggedLetters).subtracting(storedLetters))")
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0)
    }
}
