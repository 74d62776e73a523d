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
        let (ingest, base, key) = try harness.startIngest(extra: ["--idle-timeout-seconds", "2"])
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let port = try XCTUnwrap(Int(base.split(separator: ":").last ?? ""))
        try resetConnections(port: port, request: "")
        try resetConnections(port: port, request: "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try resetConnections(port: port, request: "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/livez").status, 200, ingest.log)
        XCTAssertNil(ingest.wait(timeout: .milliseconds(50)), ingest.log)

        // A silent connection, and one trickling a request head, are closed after the idle timeout
        // (2 s here, 30 s by default); the consumers' ops ports close them after 5 s.
        for (name, port, limit) in [("ingest", port, 2.0), ("aggregator ops", try XCTUnwrap(aggregator.opsPort), 5.0)] {
            for trickle in [false, true] {
                let closedAfter = try secondsUntilClosed(port: port, trickle: trickle)
                XCTAssertGreaterThanOrEqual(closedAfter, limit - 0.5, "\(name), trickle \(trickle)")
                XCTAssertLessThan(closedAfter, limit + 3, "\(name), trickle \(trickle): the server closes the connection")
            }
        }
        // The API port's /metrics needs a key (Prometheus sends one with `authorization`).
        XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/metrics").status, 401)
        let scrape = try http("GET", "http://127.0.0.1:\(port)/metrics", authorization: "Bearer \(key)")
        XCTAssertEqual(scrape.status, 200)
        XCTAssertTrue(scrape.body.contains("tally_ingest_requests_total"), scrape.body)
    }

    /// Opens a connection that sends nothing (or a request head one byte every 0.25 s) and returns
    /// the seconds until the server closed it (at most 12).
    func secondsUntilClosed(port: Int, trickle: Bool) throws -> Double {
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", """
            import select, socket, sys, time
            s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
            head, trickle, start = b"GET /livez HTTP/1.1\\r\\nHost: x\\r\\nX-Padding: " + b"p" * 60, sys.argv[2] == "1", time.monotonic()
            sent = 0
            while time.monotonic() - start < 12:
                readable, _, _ = select.select([s], [], [], 0.25)
                if readable:
                    try:
                        if s.recv(4096) == b"": break
                    except ConnectionResetError:
                        break
                if trickle and sent < len(head):
                    try:
                        s.send(head[sent:sent + 1]); sent += 1
                    except OSError:
                        break
            print(round(time.monotonic() - start, 2))
            """, String(port), trickle ? "1" : "0"])
        XCTAssertEqual(status, 0, output)
        return try XCTUnwrap(Double(output.trimmingCharacters(in: .whitespacesAndNewlines)), output)
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
        let base = try ingest.listeningURL()
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

    /// The HMAC of the documented credit signature (docs/security.md), computed by Python's own
    /// `hmac` module: an implementation independent of Tally's.
    func pythonSignature(keyID: String, topic: String, secretHex: String, key: String, value: String) throws -> String {
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", """
            import hashlib, hmac, sys
            topic, key, value = sys.argv[2].encode(), sys.argv[3].encode(), sys.argv[4].encode()
            message = b"tally-credit-v1\\x00" + len(topic).to_bytes(4, "big") + topic + len(key).to_bytes(4, "big") + key + value
            print(hmac.new(bytes.fromhex(sys.argv[1]), message, hashlib.sha256).hexdigest())
            """, secretHex, topic, key, value])
        XCTAssertEqual(status, 0, output)
        return "v1:\(keyID):" + output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func grantValue(_ id: String, customer: String, amount: String) -> String {
        String(decoding: EventEncoder.encode(GrantEvent(id: id, source: "app://billing", subject: customer, time: EventTime("2026-11-30T00:00:00Z")!,
                                                        amountNanos: Money.nanos(amount)!, currency: Currency("USD")!)), as: UTF8.self)
    }

    /// Finding 2: anyone who could write to the topic could mint credit. Now the rater applies a
    /// grant or void only with a valid signature of a key in its keyring; the rest are dead-lettered
    /// as `unsigned_credit` and credit nothing. Credit consumed before signing began stays applied
    /// (by position, so replays agree), and a rotated key keeps verifying what it signed.
    func testCreditWrittenStraightIntoTheTopicIsNotApplied() async throws {
        let harness = try AggregatorHarness(partitions: 4)
        let keyFile = try XCTUnwrap(ProcessInfo.processInfo.environment["TALLY_CREDIT_KEYS_FILE"])
        let lines: [[Substring]] = try String(contentsOfFile: keyFile, encoding: .utf8).split(separator: "\n").map { $0.split(separator: " ") }
        let stackKey: [Substring] = try XCTUnwrap(lines.first { (fields: [Substring]) -> Bool in fields.count == 3 && fields[2] == "sign" })
        let (keyID, secret) = (String(stackKey[0]), String(stackKey[1]))
        let customer = "cust-forge"

        // Written before signing began: the migration records the first offset whose credit must be signed.
        let legacy = try ProducerContractTests.producePython(harness.topic, partitioner: "murmur2_random", [
            ["key": "cust-legacy", "value": grantValue("g-legacy", customer: "cust-legacy", amount: "7.00")],
        ])[0]
        let legacyPartition = try XCTUnwrap(legacy.partition)
        try harness.connection.query("INSERT INTO tally.unsigned_credit_horizon VALUES ($1, $2, $3)",
                                     [harness.topic, Int64(legacyPartition), Int64(1)])

        let python = grantValue("g-python", customer: customer, amount: "100.00")
        let pythonSigned = try pythonSignature(keyID: keyID, topic: harness.topic, secretHex: secret, key: customer, value: python)
        let forged = grantValue("g-forged", customer: customer, amount: "300.00")
        let small = grantValue("g-altered", customer: customer, amount: "1.00")
        let binaryData = #"{"amount":"50.00","currency":"USD","priority":100,"source":"purchase"}"#
        let void = String(decoding: EventEncoder.encode(GrantVoidEvent(id: "void-g-python", source: "app://billing", subject: customer,
                                                                       time: EventTime("2026-11-30T01:00:00Z")!, grantID: "g-python")), as: UTF8.self)
        func record(_ value: String, signature: String? = nil, headers: [String: String] = [:]) -> [String: Any] {
            var headers = headers
            if let signature { headers["tally-credit-signature"] = signature }
            return ["key": customer, "value": value, "headers": headers]
        }
        let forgedSignature = try pythonSignature(keyID: keyID, topic: harness.topic, secretHex: String(repeating: "ab", count: 32), key: customer, value: forged)
        let binaryHeaders = ["ce_specversion": "1.0", "ce_id": "g-binary", "ce_source": "app://billing", "ce_type": "tally.wallet.grant",
                             "ce_subject": customer, "ce_time": "2026-11-30T00:00:00Z", "content-type": "application/json"]
        let records: [[String: Any]] = [
            record(grantValue("g-unsigned", customer: customer, amount: "500.00")),
            record(forged, signature: forgedSignature),
            // Signed for 1.00, sent for 1000.00.
            record(small.replacingOccurrences(of: "\"1.00\"", with: "\"1000.00\""),
                   signature: try pythonSignature(keyID: keyID, topic: harness.topic, secretHex: secret, key: customer, value: small)),
            record(python, signature: pythonSigned),
            record(void),
            record(binaryData, signature: try pythonSignature(keyID: keyID, topic: harness.topic, secretHex: secret, key: customer, value: binaryData), headers: binaryHeaders),
        ]
        _ = try ProducerContractTests.producePython(harness.topic, partitioner: "murmur2_random", records)
        // Through the API, signed by tally-ingest.
        let (ingest, base, _) = try harness.startIngest()
        defer { ingest.signal(SIGKILL); ingest.wait() }
        let grantKey = try harness.createKey(["--grants"])
        let viaAPI = try http("POST", base + "/v1/wallets/\(customer)/grants", body: #"{"id":"g-api","amount":"25.00","currency":"USD","source":"purchase"}"#,
                              authorization: "Bearer \(grantKey)")
        XCTAssertEqual(viaAPI.status, 202, viaAPI.body)

        // A rater without the keyring does not start: it could not tell real credit from forged.
        let (refusedStatus, refusedOutput) = try ChildProcess.run(TestStack.executable("tally-rater"), [
            "--topic", harness.topic, "--database-url", harness.databaseURL, "--brokers", harness.brokers, "--ops-address", "127.0.0.1:0",
        ], environment: ["TALLY_CREDIT_KEYS_FILE": ""])
        XCTAssertNotEqual(refusedStatus, 0)
        XCTAssertTrue(refusedOutput.contains("applying credit needs the credit keys file"), refusedOutput)

        func balances() throws -> [String: String] {
            Dictionary(uniqueKeysWithValues: try harness.connection.query("SELECT customer_id, balance_nanos::text FROM tally.wallets").rows.map { ($0[0]!, $0[1]!) })
        }
        func deadLetters() throws -> [String] {
            try harness.connection.query("SELECT reason FROM tally.dead_letters WHERE reason_code = 'unsigned_credit' ORDER BY partition, record_offset").rows.map { $0[0]! }
        }
        let rater = try harness.startRater()
        XCTAssertTrue(try TestStack.eventually { try deadLetters().count == 5 && balances()[customer] == "125000000000" },
                      "\((try? deadLetters()) ?? []) \((try? balances()) ?? [:]) \(rater.log.suffix(3000))")
        let reasons = try deadLetters()
        XCTAssertEqual(reasons.filter { $0.hasPrefix("no tally-credit-signature header") }.count, 2, "the unsigned grant and void: \(reasons)")
        XCTAssertEqual(reasons.filter { $0.contains("does not match the record") }.count, 2, "the forged and the altered grant: \(reasons)")
        XCTAssertEqual(reasons.filter { $0.contains("structured-mode") }.count, 1, "\(reasons)")
        XCTAssertEqual(try balances()["cust-legacy"], "7000000000", "credit from before signing stays applied")
        // The rater recorded, on claiming each partition, where its group stood (0: a new group);
        // the row made before it started (an older rater's position) was kept.
        XCTAssertEqual(try harness.connection.query("SELECT partition, signed_from_offset FROM tally.unsigned_credit_horizon WHERE topic = $1 ORDER BY partition",
                                                    [harness.topic]).rows.map { "\($0[0]!):\($0[1]!)" },
                       (0..<4).map { "\($0):\($0 == legacyPartition ? 1 : 0)" })
        XCTAssertEqual(try harness.connection.query("SELECT grant_id FROM tally.wallet_grants WHERE customer_id = $1 ORDER BY grant_id", [customer]).rows.map { $0[0]! },
                       ["g-api", "g-python"])
        rater.signal(SIGTERM)
        XCTAssertEqual(rater.wait(timeout: .seconds(30)), 0, rater.log)

        // Rotation: a new sign key; the stack's key only verifies. A grant signed with the old key
        // (made before the rotation reached `tally grant`) and one with the new key both credit.
        let rotated = NSTemporaryDirectory() + TestStack.unique("credit-keys")
        try "\(CreditKeyring.newKeyLine(id: "k-next"))\n\(keyID) \(secret) verify\n".write(toFile: rotated, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: rotated) }
        for (keys, id, amount) in [(keyFile, "g-old-key", "5.00"), (rotated, "g-new-key", "10.00")] {
            let (status, output) = try ChildProcess.run(TestStack.executable("tally"), [
                "grant", "--topic", harness.topic, "--customer", customer, "--amount", amount, "--id", id, "--credit-keys-file", keys,
            ])
            XCTAssertEqual(status, 0, output)
        }
        let next = try harness.startRater(environment: ["TALLY_CREDIT_KEYS_FILE": rotated])
        XCTAssertTrue(try TestStack.eventually { try balances()[customer] == "140000000000" }, "\((try? balances()) ?? [:]) \(next.log.suffix(3000))")
        XCTAssertEqual(try deadLetters().count, 5)
        next.signal(SIGTERM)
        XCTAssertEqual(next.wait(timeout: .seconds(30)), 0, next.log)

        // A replay from offset zero applies the same credit: nothing differs.
        let (replayStatus, replayOutput) = try ChildProcess.run(TestStack.executable("tally"), [
            "replay", "--consumer", "rater", "--dry-run", "--live-group", harness.group, "--topic", harness.topic,
            "--database-url", harness.databaseURL, "--credit-keys-file", rotated,
        ])
        XCTAssertEqual(replayStatus, 0, replayOutput)
    }

    /// Finding 7: the local PostgreSQL needs a password on TCP, Tally's role is no superuser (so
    /// no COPY ... PROGRAM), and the dashboards' role reads the dashboard views and nothing else.
    func testTheDatabaseRolesHoldOnlyWhatTheyNeed() throws {
        let harness = try AggregatorHarness()
        XCTAssertEqual(try harness.connection.query("SELECT rolsuper::text, rolcreaterole::text FROM pg_roles WHERE rolname = current_user").rows[0], ["false", "false"])
        XCTAssertThrowsError(try harness.connection.query("COPY (SELECT 1) TO PROGRAM 'id'")) { error in
            XCTAssertTrue("\(error)".contains("pg_execute_server_program"), "\(error)")
        }
        let port = try XCTUnwrap(URLComponents(string: try TestStack.databaseURL)?.port)
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["psql", "-w", "-h", "127.0.0.1", "-p", String(port), "-U", "tally", "-d", "tally", "-c", "SELECT 1"],
                                                    environment: ["PGPASSFILE": "/nonexistent"])
        XCTAssertNotEqual(status, 0, "no password, no connection")
        XCTAssertTrue(output.contains("no password supplied"), output)

        let name = try XCTUnwrap(harness.databaseURL.split(separator: "/").last.map { String($0.split(separator: "?")[0]) })
        func asReader(_ sql: String) throws -> (status: Int32, output: String) {
            try ChildProcess.run("/usr/bin/env", ["psql", "-w", "-h", "127.0.0.1", "-p", String(port), "-U", "tally_reader", "-d", name, "-Atc", sql])
        }
        let view = try asReader("SELECT count(*) FROM tally.dashboard_wallets")
        XCTAssertEqual(view.status, 0, view.output)
        for table in ["api_keys", "wallet_ledger", "usage_event_keys", "customers", "dead_letters"] {
            let denied = try asReader("SELECT count(*) FROM tally.\(table)")
            XCTAssertNotEqual(denied.status, 0, table)
            XCTAssertTrue(denied.output.contains("permission denied for table \(table)"), denied.output)
        }
    }
}
