import Foundation
import TallyCore
import TallyKafka
import XCTest

/// The producer contract (README, "Producing to the topic yourself") with a producer Tally did
/// not write: Python's confluent-kafka beside tally-ingest, the aggregator counting both.
final class ProducerContractTests: XCTestCase {
    static let script = TestStack.root.appendingPathComponent("Tests/TallyIntegrationTests/Producers/confluent_produce.py").path

    struct Delivery: Decodable {
        let key: String
        let partition: Int32?
        let error: String?
    }

    /// Publishes `records` through confluent-kafka with `partitioner`; answers each one's partition.
    func producePython(_ topic: String, partitioner: String, _ records: [[String: Any]]) throws -> [Delivery] {
        try Self.producePython(topic, partitioner: partitioner, records)
    }

    static func producePython(_ topic: String, partitioner: String, _ records: [[String: Any]]) throws -> [Delivery] {
        let path = NSTemporaryDirectory() + "tally-records-\(UInt32.random(in: 0...UInt32.max)).jsonl"
        let lines = try records.map { String(decoding: try JSONSerialization.data(withJSONObject: $0), as: UTF8.self) }
        try lines.joined(separator: "\n").write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", script, try TestStack.brokers, topic, partitioner, path])
        XCTAssertEqual(status, 0, output)
        let deliveries = try output.split(separator: "\n").filter { $0.hasPrefix("delivery ") }.map {
            try JSONDecoder().decode(Delivery.self, from: Data($0.dropFirst("delivery ".count).utf8))
        }
        XCTAssertEqual(deliveries.count, records.count, output)
        XCTAssertTrue(deliveries.allSatisfy { $0.error == nil }, output)
        return deliveries
    }

    func usageValue(_ id: String, source: String, customer: String, input: Int64, model: String = "gpt-4o") -> String {
        let time = EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000) - 60_000_000)
        return String(decoding: EventEncoder.encode(UsageEvent(id: id, source: source, subject: customer, time: time, model: model,
                                                               inputTokens: input, outputTokens: 1)), as: UTF8.self)
    }

    func testAJavaCompatibleProducerAndTallyIngestAgreeAndAStrayRecordIsReported() async throws {
        let harness = try AggregatorHarness(partitions: 4)
        let (ingest, base, apiKey) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let customers = (0..<24).map { "team-\($0)" }
        var expected: [UsageEvent] = []
        var partitionsOf: [String: Set<Int32>] = [:]

        // 1. The team's own producer, with the Java client's partitioner.
        let python = try producePython(harness.topic, partitioner: "murmur2_random", customers.map {
            ["key": $0, "value": usageValue("py-\($0)", source: "app://python", customer: $0, input: 10)]
        })
        for delivery in python { partitionsOf[delivery.key, default: []].insert(delivery.partition!) }
        // 2. tally-ingest, for the same customers; the same ids from another source are other events.
        let batch = customers.map { usageValue("py-\($0)", source: "app://http", customer: $0, input: 100) }.joined(separator: "\n")
        let response = try http("POST", base + "/v1/events", contentType: "application/x-ndjson", body: batch,
                                authorization: "Bearer \(apiKey)")
        XCTAssertEqual(response.status, 202, response.body)
        let results = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any])?["results"] as? [[String: Any]])
        XCTAssertEqual(results.count, customers.count)
        for (index, result) in results.enumerated() {
            XCTAssertEqual(result["status"] as? String, "accepted", "\(result)")
            partitionsOf[customers[index], default: []].insert(Int32(try XCTUnwrap(result["partition"] as? Int)))
        }
        // 3. A CloudEvent in Kafka binary mode: attributes in ce_ headers, the value is its data.
        let binary = try producePython(harness.topic, partitioner: "murmur2_random", [[
            "key": customers[0], "value": #"{"model":"gpt-4o","input_tokens":1000,"output_tokens":1}"#,
            "headers": ["ce_specversion": "1.0", "ce_id": "binary-1", "ce_source": "app://binary", "ce_type": "llm.usage",
                        "ce_subject": customers[0], "ce_time": EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000)).text,
                        "content-type": "application/json"],
        ]])
        partitionsOf[customers[0], default: []].insert(binary[0].partition!)
        XCTAssertTrue(partitionsOf.values.allSatisfy { $0.count == 1 }, "every customer on one partition: \(partitionsOf)")
        XCTAssertGreaterThan(Set(partitionsOf.values.map { $0.first! }).count, 1, "customers spread over partitions")

        // 4. A producer on librdkafka's old default (CRC32): some customers land elsewhere.
        let stray = try producePython(harness.topic, partitioner: "consistent_random", customers.map {
            ["key": $0, "value": usageValue("crc-\($0)", source: "app://legacy", customer: $0, input: 1)]
        })
        let misplaced = stray.filter { !partitionsOf[$0.key]!.contains($0.partition!) }.map(\.key)
        XCTAssertFalse(misplaced.isEmpty, "CRC32 and murmur2 disagree for some of 24 keys")

        // What must be counted, worked out from the inputs: 10 + 100 per customer, the binary
        // event's 1000, and the CRC32 records that happened to land on their customer's partition.
        let time = EventTime(microseconds: 0)
        for customer in customers {
            expected.append(UsageEvent(id: "py-\(customer)", source: "app://python", subject: customer, time: time, model: "gpt-4o", inputTokens: 10, outputTokens: 1))
            expected.append(UsageEvent(id: "py-\(customer)", source: "app://http", subject: customer, time: time, model: "gpt-4o", inputTokens: 100, outputTokens: 1))
            if !misplaced.contains(customer) {
                expected.append(UsageEvent(id: "crc-\(customer)", source: "app://legacy", subject: customer, time: time, model: "gpt-4o", inputTokens: 1, outputTokens: 1))
            }
        }
        let aggregator = try harness.startAggregator()
        defer { aggregator.signal(SIGKILL) }
        // The log end, from the deliveries (Tansu's queried end is not exact).
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(90)) {
            let letters = try harness.connection.query("SELECT count(*) FROM tally.dead_letters").int64(0, 0) ?? 0
            let counted = try harness.connection.query("SELECT count(*) FROM tally.usage_event_keys").int64(0, 0) ?? 0
            return letters == Int64(misplaced.count) && counted == Int64(expected.count + 1)
        }, aggregator.log)
        let totals = try harness.connection.query("""
            SELECT customer_id, sum(input_tokens)::bigint FROM tally.usage_hourly GROUP BY 1
            """).rows
        var input: [String: Int64] = [:]
        for row in totals { input[row[0]!] = Int64(row[1]!)! }
        for customer in customers {
            XCTAssertEqual(input[customer], 110 + (misplaced.contains(customer) ? 0 : 1) + (customer == customers[0] ? 1000 : 0), customer)
        }
        // Each stray record is reported with where its customer belongs, in the table, log and status.
        let letters = try harness.connection.query("SELECT reason_code, reason FROM tally.dead_letters ORDER BY reason").rows
        XCTAssertTrue(letters.allSatisfy { $0[0] == "wrong_partition" }, "\(letters)")
        for customer in misplaced {
            let home = partitionsOf[customer]!.first!
            XCTAssertTrue(letters.contains { $0[1]!.contains("customer \(customer) belongs on partition \(home) of 4") }, "\(customer): \(letters)")
        }
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(10)) { aggregator.log.contains(#""reason":"wrong_partition""#) }, aggregator.log)
        let status = try harness.tally(["status", "--topic", harness.topic])
        XCTAssertTrue(status.contains("records set aside (in tally.dead_letters"), status)
        XCTAssertTrue(status.contains("wrong_partition"), status)
    }

    /// Issue #20, grants: a grant of 100.00 made with `tally grant` and three usage events of 3.50
    /// from a murmur2 producer share one partition and one wallet: 89.50 left, drawn from the grant.
    /// `tally grant` run again with the same id (a new time) is a retry, not a conflict; the same
    /// id with 50.00 is refused at the API (409); a void writes off the 89.50 left, once however
    /// often it is sent.
    func testGrantsOnOneWalletRetriedRefusedAndVoided() async throws {
        let harness = try AggregatorHarness(partitions: 4)
        let book = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("prices") + ".yaml")
        try """
            book: default
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            models:
              - { model: flat-350, input: "3.50", output: "0" }
            """.write(to: book, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: book) }
        try harness.tally(["pricing", "apply", book.path])
        let customer = "wallet-\(UInt32.random(in: 0...UInt32.max))"
        func grantCLI() throws {
            let (status, output) = try ChildProcess.run(TestStack.executable("tally"), ["grant", "--topic", harness.topic, "--customer", customer,
                                                                                       "--amount", "100.00", "--id", "g-100"])
            XCTAssertEqual(status, 0, output)
        }
        try grantCLI()
        // 1,000,000 input tokens at 3.50 per 1M: 3.50 each.
        _ = try producePython(harness.topic, partitioner: "murmur2_random", (1...3).map {
            ["key": customer, "value": usageValue("use-\($0)", source: "app://java", customer: customer, input: 1_000_000, model: "flat-350")]
        })
        try grantCLI()
        let rater = try harness.startRater()
        defer { rater.signal(SIGKILL) }
        func balance() throws -> String? {
            try harness.connection.query("SELECT balance_nanos::text FROM tally.wallets WHERE customer_id = $1", [customer]).rows.first?[0] ?? nil
        }
        func ledger() throws -> [[String?]] {
            try harness.connection.query("SELECT kind, amount_nanos::text, coalesce(grant_id, '') FROM tally.wallet_ledger WHERE customer_id = $1 ORDER BY partition, record_offset, seq", [customer]).rows
        }
        func ledgerText() -> String { (try? ledger()).map { "\($0)" } ?? "" }
        XCTAssertTrue(try TestStack.eventually { try ledger().count == 4 }, "\((try? harness.connection.query("SELECT reason FROM tally.dead_letters UNION ALL SELECT reason FROM tally.unrateable_records UNION ALL SELECT model FROM tally.unpriced_usage").rows).map { "\($0)" } ?? "") \(rater.log.suffix(3000))")
        XCTAssertTrue(try TestStack.eventually { try balance() == "89500000000" }, ledgerText())
        XCTAssertEqual(try ledger().map { $0[0]! }, ["grant", "usage", "usage", "usage"])
        XCTAssertEqual(try ledger().filter { $0[0] == "usage" }.map { $0[2]! }, ["g-100", "g-100", "g-100"], "drawn from the grant")
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.event_conflicts WHERE customer_id = $1", [customer]).int64(0, 0), 0,
                       "the second tally grant is a retry")

        let (ingest, base, _) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let grantKey = try harness.createKey(["--grants"])
        let other = try http("POST", base + "/v1/wallets/\(customer)/grants", body: #"{"id":"g-100","amount":"50.00","currency":"USD","source":"purchase"}"#,
                             authorization: "Bearer \(grantKey)")
        XCTAssertEqual(other.status, 409, other.body)
        XCTAssertTrue(other.body.contains("was credited as 100.00 USD"), other.body)
        let retry = try http("POST", base + "/v1/wallets/\(customer)/grants", body: #"{"id":"g-100","amount":"100.00","currency":"USD","source":"purchase"}"#,
                             authorization: "Bearer \(grantKey)")
        XCTAssertEqual(retry.status, 202, "the same terms are a retry: \(retry.body)")

        for _ in 0..<2 {
            let void = try http("POST", base + "/v1/wallets/\(customer)/grants/g-100/void", body: #"{"reason":"refund of order 1042"}"#,
                                authorization: "Bearer \(grantKey)")
            XCTAssertEqual(void.status, 202, void.body)
            XCTAssertTrue(void.body.contains(#""id":"void-g-100""#), void.body)
        }
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"), ["void-grant", "--topic", harness.topic, "--customer", customer, "--grant", "g-100"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(try TestStack.eventually { try balance() == "0" }, ledgerText())
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(10)) { try harness.connection.query(
            "SELECT count(*) FROM tally.rater_event_keys WHERE customer_id = $1", [customer]).int64(0, 0) == 5 }, "3 usage, 1 grant, 1 void")
        XCTAssertEqual(try ledger().last.map { [$0[0]!, $0[1]!, $0[2]!] }, ["void", "-89500000000", "g-100"])
        XCTAssertEqual(try ledger().count, 5, "one void, however often sent")
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.event_conflicts WHERE customer_id = $1", [customer]).int64(0, 0), 0)
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.unrateable_records WHERE customer_id = $1", [customer]).int64(0, 0), 0)
    }

    /// Issue #20: `tally topics create` keeps the usage and dead-letter topics forever
    /// (retention.ms=-1, read back through the broker's DescribeConfigs by Python's AdminClient)
    /// and takes the broker's replication factor; `--retention-ms` overrides.
    func testTopicsCreateKeepsTheLogForever() throws {
        let topic = TestStack.unique("test.topics")
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"), ["topics", "create", "--topic", topic, "--partitions", "3"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("\(topic): created, 3 partitions, retention.ms=-1"), output)
        let other = TestStack.unique("test.topics")
        let (otherStatus, otherOutput) = try ChildProcess.run(TestStack.executable("tally"), ["topics", "create", "--topic", other, "--retention-ms", "86400000"])
        XCTAssertEqual(otherStatus, 0, otherOutput)
        let script = """
            import json, sys
            from confluent_kafka.admin import AdminClient, ConfigResource
            admin = AdminClient({"bootstrap.servers": sys.argv[1]})
            found = {}
            for resource, future in admin.describe_configs([ConfigResource("topic", name) for name in sys.argv[2:]]).items():
                found[resource.name] = {k: v.value for k, v in future.result(timeout=10).items()}.get("retention.ms")
            print(json.dumps(found))
            """
        let (describeStatus, described) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", script, try TestStack.brokers,
                                                                               topic, topic + ".dlq", other])
        XCTAssertEqual(describeStatus, 0, described)
        let retention = try JSONDecoder().decode([String: String?].self, from: Data(described.split(separator: "\n").last.map(String.init)?.utf8 ?? "".utf8))
        XCTAssertEqual(retention, [topic: "-1", topic + ".dlq": "-1", other: "86400000"])
    }

}
