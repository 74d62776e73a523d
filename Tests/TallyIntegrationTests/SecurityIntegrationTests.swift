import Foundation
import TallyCore
import TallyKafka
import XCTest

/// Issue #21: what a hostile or careless client can do to a running process.
final class SecurityIntegrationTests: XCTestCase {
    /// Connects to 127.0.0.1:`port`, sends `request`, and closes with a TCP reset (SO_LINGER 0), `times` times.
    func resetConnections(port: Int, request: String, times: Int = 5) throws {
        let script = """
            import socket, struct, sys, time
            port, request, times = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3])
            for _ in range(times):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.sendall(request)
                s.close()
                time.sleep(0.05)
            """
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", script, String(port), request, String(times)])
        XCTAssertEqual(status, 0, output)
    }

    /// Finding 1: a TCP reset used to kill a consumer (SIGPIPE, exit 141) through its ops port; one
    /// connection trickling a byte a second blocked the port. Both consumers and the ingest API
    /// port now shrug both off.
    func testATCPResetOrASlowClientStopsNothing() async throws {
        let harness = try AggregatorHarness()
        let aggregator = try harness.startAggregator()
        let rater = try harness.startRater(["--group", harness.group + "-rater"])
        for process in [aggregator, rater] {
            XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) { process.opsPort != nil }, process.log)
            let port = try XCTUnwrap(process.opsPort)
            // What a port scanner does: connect, reset. The reply then goes to a reset connection.
            try resetConnections(port: port, request: "")
            try resetConnections(port: port, request: "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            // A client sending a byte a second holds its connection; /livez still answers meanwhile.
            let slow = try ChildProcess("/usr/bin/env", ["python3", "-c", """
                import socket, sys, time
                s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
                for _ in range(20):
                    s.send(b"G"); time.sleep(1)
                """, String(port)])
            defer { slow.signal(SIGKILL); slow.wait() }
            try await Task.sleep(for: .milliseconds(500))
            let started = ContinuousClock.now
            XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/livez").status, 200, process.log)
            XCTAssertLessThan(ContinuousClock.now - started, .seconds(4), "the slow client holds the port at most 2 s")
            XCTAssertNil(process.wait(timeout: .milliseconds(50)), "alive after resets\n\(process.log)")
        }
        // Still consuming: an event published now is counted.
        let events = AggregatorHarness.events(count: 20, seed: 2101)
        try await harness.publish(events)
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        try harness.assertTotals(equal: AggregatorHarness.recount(events))

        // The ingest API port.
        let (ingest, base, _) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let port = try XCTUnwrap(Int(base.split(separator: ":").last ?? ""))
        try resetConnections(port: port, request: "")
        try resetConnections(port: port, request: "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try resetConnections(port: port, request: "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/livez").status, 200, ingest.log)
        XCTAssertNil(ingest.wait(timeout: .milliseconds(50)), ingest.log)
    }

    /// Findings 2 and 4: a grant key limited to a customer grants to that customer only; a path
    /// segment is percent-decoded once; a grant dated outside the event-time window is refused;
    /// an event of 66 KB within every documented limit (64 properties of 1,024 characters) is
    /// accepted and counted.
    func testGrantScopesPathsTimesAndTheLargestEvent() async throws {
        let harness = try AggregatorHarness()
        let (ingest, base, usageKey) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let scoped = try harness.createKey(["--grants", "--customer", "cust-a"])
        let body = #"{"id":"g-1","amount":"10.00","currency":"USD","source":"purchase"}"#
        let other = try http("POST", base + "/v1/wallets/cust-b/grants", body: body, authorization: "Bearer \(scoped)")
        XCTAssertEqual(other.status, 403, other.body)
        XCTAssertTrue(other.body.contains(#"may only grant or void credit of customer \"cust-a\""#), other.body)
        let own = try http("POST", base + "/v1/wallets/cust-a/grants", body: body, authorization: "Bearer \(scoped)")
        XCTAssertEqual(own.status, 202, own.body)
        let voidOther = try http("POST", base + "/v1/wallets/cust-b/grants/g-1/void", authorization: "Bearer \(scoped)")
        XCTAssertEqual(voidOther.status, 403, voidOther.body)

        let anyCustomer = try harness.createKey(["--grants"])
        let spaced = try http("POST", base + "/v1/wallets/acme%20corp/grants", body: #"{"id":"g-2","amount":"1.00","currency":"USD","source":"purchase"}"#,
                              authorization: "Bearer \(anyCustomer)")
        XCTAssertEqual(spaced.status, 202, spaced.body)
        let far = try http("POST", base + "/v1/wallets/cust-a/grants",
                           body: #"{"id":"g-3","amount":"1.00","currency":"USD","source":"purchase","time":"9999-12-31T00:00:00Z"}"#,
                           authorization: "Bearer \(anyCustomer)")
        XCTAssertEqual(far.status, 400, far.body)
        XCTAssertTrue(far.body.contains("minutes in the future"), far.body)

        // 64 properties of 128-character keys and 1,024-character values: about 72 KB.
        let properties = (0..<64).map { (String(format: "%03d", $0) + String(repeating: "k", count: 125), String(repeating: "v", count: 1024)) }
        let large = UsageEvent(id: "large-1", source: "app://big", subject: "cust-large",
                               time: EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000) - 60_000_000),
                               model: "gpt-4o", inputTokens: 66, outputTokens: 1, properties: Dictionary(uniqueKeysWithValues: properties))
        let bytes = EventEncoder.encode(large)
        XCTAssertGreaterThan(bytes.count, 66_000)
        let accepted = try http("POST", base + "/v1/events", body: String(decoding: bytes, as: UTF8.self), authorization: "Bearer \(usageKey)")
        XCTAssertEqual(accepted.status, 202, accepted.body)

        let aggregator = try harness.startAggregator()
        defer { aggregator.signal(SIGKILL) }
        XCTAssertTrue(try TestStack.eventually {
            try harness.connection.query("SELECT count(*) FROM tally.usage_event_keys WHERE event_id = 'large-1'").int64(0, 0) == 1
        }, aggregator.log)
        XCTAssertEqual(try harness.connection.query("SELECT count(*) FROM tally.dead_letters").int64(0, 0), 0)
        // The grant for "acme corp" was written under that customer: its record key says so.
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: harness.brokers), groupID: nil, logger: TestStack.logger)
        defer { consumer.close() }
        try consumer.assign(Dictionary(uniqueKeysWithValues: (0..<4).map { (TopicPartition(harness.topic, Int32($0)), KafkaOffset.beginning) }))
        var keys = Set<String>()
        _ = TestStack.eventually(timeout: .seconds(15)) {
            keys.formUnion(consumer.poll(maxRecords: 100, timeout: .milliseconds(200)).map { String(decoding: $0.key ?? [], as: UTF8.self) })
            return keys.contains("acme corp")
        }
        XCTAssertTrue(keys.contains("acme corp"), "\(keys)")
        XCTAssertFalse(keys.contains("acme%20corp"))
    }

    /// Finding 5: a per-key rate limit. 40 requests at once from one key against 5 per second
    /// (bursts of 10): about 10 go, the rest get 429 with Retry-After; another key is unaffected.
    func testAKeyPastItsRateGets429() throws {
        let harness = try AggregatorHarness()
        let greedy = try harness.createKey()
        let other = try harness.createKey()
        let ingest = try ChildProcess(TestStack.executable("tally-ingest"), ["--port", "0", "--host", "127.0.0.1", "--topic", harness.topic,
                                                                             "--database-url", harness.databaseURL, "--max-requests-per-key-per-second", "5"])
        defer { ingest.signal(SIGKILL); ingest.wait() }
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) { ingest.log.contains("listening on http://") }, ingest.log)
        let range = try XCTUnwrap(ingest.log.range(of: #"listening on http://[0-9.]+:[0-9]+"#, options: .regularExpression))
        let base = "http://127.0.0.1:" + (ingest.log[range].split(separator: ":").last.map(String.init) ?? "")
        let script = """
            import sys, urllib.request, urllib.error
            from concurrent.futures import ThreadPoolExecutor
            url, key = sys.argv[1], sys.argv[2]
            def call(_):
                req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
                try:
                    return (urllib.request.urlopen(req, timeout=30).status, "")
                except urllib.error.HTTPError as error:
                    return (error.code, error.headers.get("Retry-After") or "")
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(call, range(40)))
            print(sum(1 for s, _ in results if s == 429), all(r for s, r in results if s == 429))
            """
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", script, base + "/v1/events", greedy])
        XCTAssertEqual(status, 0, output)
        let fields = output.split(whereSeparator: \.isWhitespace)
        let limited = Int(fields.first ?? "") ?? 0
        XCTAssertGreaterThanOrEqual(limited, 20, output)
        XCTAssertLessThan(limited, 40, output)
        XCTAssertEqual(fields.last, "True", "every 429 says when to retry: \(output)")
        XCTAssertEqual(try http("POST", base + "/v1/events", body: "{}", authorization: "Bearer \(other)").status, 400, "another key has its own share")
    }
}
