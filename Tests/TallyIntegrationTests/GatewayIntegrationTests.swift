import Foundation
import TallyCore
import TallyKafka
import XCTest

/// tally-ingest in gateway mode against a local fake upstream (scripts/fake-llm-upstream, which
/// speaks the OpenAI and Anthropic wire formats), the real broker, PostgreSQL and rater.
final class GatewayIntegrationTests: XCTestCase {
    var harness: AggregatorHarness!
    var upstream: ChildProcess!
    var upstreamURL: String!
    var gateway: ChildProcess!
    var gatewayURL: String!

    override func setUp() async throws {
        harness = try AggregatorHarness()
        upstream = try ChildProcess(TestStack.root.appendingPathComponent("scripts/fake-llm-upstream").path, ["--port", "0", "--key", "sk-upstream"])
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(10)) { upstream.log.contains("listening on") }, upstream.log)
        upstreamURL = "http://127.0.0.1:" + upstream.log.split(separator: " ").last!.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    override func tearDown() {
        for process in [gateway, upstream].compactMap({ $0 }) {
            process.signal(SIGKILL)
            process.wait()
        }
        // XCTest keeps test case instances: dropping the harness now stops the consumers it started.
        harness = nil
    }

    func startGateway(_ extra: [String] = []) throws {
        gateway = try ChildProcess(TestStack.executable("tally-ingest"), [
            "--port", "0", "--host", "127.0.0.1", "--topic", harness.topic, "--database-url", harness.databaseURL,
            "--openai-upstream", upstreamURL, "--anthropic-upstream", upstreamURL, "--rater-group", harness.group,
        ] + extra, environment: ["TALLY_OPENAI_API_KEY": "sk-upstream", "TALLY_ANTHROPIC_API_KEY": "sk-upstream"])
        gatewayURL = try gateway.listeningURL()
    }

    func customerKey(_ customer: String) throws -> String {
        let output = try harness.tally(["keys", "create", "--name", "gw-test", "--customer", customer])
        let range = try XCTUnwrap(output.range(of: "tally_[0-9a-f]{8}_[0-9a-f]{48}", options: .regularExpression), output)
        return String(output[range])
    }

    /// tally-ingest's metrics, scraped with a key as Prometheus would (a scrape without one gets 401).
    func metricsScrape() throws -> String {
        XCTAssertEqual(try httpGet(gatewayURL + "/metrics").status, 401, "no key, no metrics")
        let customers = try http("GET", gatewayURL + "/metrics", authorization: "Bearer \(try customerKey("gw-metrics"))")
        XCTAssertEqual(customers.status, 403, "a customer's key reads no metrics: \(customers.body)")
        return try http("GET", gatewayURL + "/metrics", authorization: "Bearer \(try harness.createKey())").body
    }

    struct Call {
        let index: Int
        let status: Int
        let headers: [String: String]
        let body: String
        let error: String?
    }

    /// Runs scripts/llm-client: `count` calls, `concurrency` at a time.
    func calls(_ url: String, key: String, body: String, count: Int = 1, concurrency: Int = 1, keyHeader: String = "authorization",
               headers: [String] = []) throws -> [Call] {
        let (status, output) = try ChildProcess.run(TestStack.root.appendingPathComponent("scripts/llm-client").path,
            ["--url", url, "--key", key, "--key-header", keyHeader, "--body", body, "--count", String(count), "--concurrency", String(concurrency)]
            + headers.flatMap { ["--header", $0] })
        XCTAssertEqual(status, 0, output)
        return try output.split(separator: "\n").compactMap { line -> Call? in
            guard line.hasPrefix("{") else { return nil }
            let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            return Call(index: object["i"] as! Int, status: object["status"] as! Int, headers: object["headers"] as? [String: String] ?? [:],
                        body: object["body"] as? String ?? "", error: object["error"] as? String)
        }.sorted { $0.index < $1.index }
    }

    func upstreamCalls() throws -> Int {
        let response = try httpGet(upstreamURL + "/_calls")
        return (try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any])?["calls"] as? Int ?? -1
    }

    /// Every usage event in the topic, by id (waits until at least `count` are there, then a little longer).
    func events(atLeast count: Int) throws -> [String: UsageEvent] {
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: harness.brokers), groupID: nil, logger: TestStack.logger)
        defer { consumer.close() }
        try consumer.assign(Dictionary(uniqueKeysWithValues: (0..<4).map { (TopicPartition(harness.topic, Int32($0)), KafkaOffset.beginning) }))
        var records: [ConsumerRecord] = []
        _ = TestStack.eventually(timeout: .seconds(20)) {
            records += consumer.poll(maxRecords: 1000, timeout: .milliseconds(200))
            return records.count >= count
        }
        records += consumer.poll(maxRecords: 1000, timeout: .milliseconds(1000))
        var events: [String: UsageEvent] = [:]
        for record in records {
            guard case .event(.usage(let event)) = ClassifiedRecord.classify(record.value, key: .some(record.key)) else { continue }
            XCTAssertNil(events[event.id], "event \(event.id) is in the topic twice")
            events[event.id] = event
        }
        return events
    }

    /// The fake upstream's counts (see its docstring), in Tally's canonical form.
    func expectedCounts(_ api: GatewayAPI, upstreamBody: String, maxTokens: Int64) -> TokenCounts {
        let input = 10 + Int64(upstreamBody.utf8.count / 8)
        let output = min(maxTokens, 40)
        switch api {
        case .chatCompletions: return TokenCounts(input: input, output: output, cacheRead: 3)
        case .responses: return TokenCounts(input: input, output: output, cacheRead: 3, reasoning: min(5, output))
        case .messages: return TokenCounts(input: input, output: output, cacheRead: 4, cacheWrite: 2)
        }
    }

    func counts(_ event: UsageEvent) -> TokenCounts {
        TokenCounts(input: event.inputTokens, output: event.outputTokens, cacheRead: event.cacheReadInputTokens,
                    cacheWrite: event.cacheWriteInputTokens, reasoning: event.reasoningOutputTokens)
    }

    func body(_ api: GatewayAPI, stream: Bool, maxTokens: Int64 = 12) -> String {
        switch api {
        case .chatCompletions: return #"{"model":"gpt-4o","temperature":0.2,"max_tokens":\#(maxTokens),"stream":\#(stream),"messages":[{"role":"user","content":"Say hi"}]}"#
        case .responses: return #"{"model":"gpt-4o","max_output_tokens":\#(maxTokens),"stream":\#(stream),"input":"Say hi"}"#
        case .messages: return #"{"model":"claude-sonnet-4","max_tokens":\#(maxTokens),"stream":\#(stream),"messages":[{"role":"user","content":"Say hi"}]}"#
        }
    }

    /// Each API, whole and streamed: the caller gets the upstream's bytes as the upstream sends them
    /// to a direct caller, and each call yields exactly one event with the reported token counts.
    func testEveryProxiedCallYieldsOneEventWithItsTokenCounts() throws {
        try startGateway()
        let key = try customerKey("gw-alice")
        var expected: [String: TokenCounts] = [:]
        for api in GatewayAPI.allCases {
            for stream in [false, true] {
                let body = body(api, stream: stream)
                let keyHeader = api == .messages ? "x-api-key" : "authorization"
                let proxied = try calls(gatewayURL + api.path, key: key, body: body, count: 2, concurrency: 2, keyHeader: keyHeader,
                                        headers: ["X-Tally-Feature: support-bot"])
                let direct = try calls(upstreamURL + api.path, key: "sk-upstream", body: body, count: 2, keyHeader: keyHeader)
                for (through, straight) in zip(proxied, direct) {
                    XCTAssertEqual(through.status, 200, "\(api) stream=\(stream): \(through.body)")
                    XCTAssertEqual(through.body, straight.body, "\(api) stream=\(stream): the caller gets what the upstream sent")
                    XCTAssertEqual(through.headers["content-type"], straight.headers["content-type"])
                    XCTAssertEqual(through.headers["x-upstream"], "fake")
                    XCTAssertNil(through.headers["set-cookie"], "a vendor's cookie is for the gateway, not its caller")
                    XCTAssertNotNil(straight.headers["set-cookie"], "the fake upstream does set one")
                    let eventID = try XCTUnwrap(through.headers["x-tally-event-id"])
                    // A streamed chat completion went upstream with include_usage added at the front.
                    let sent = api == .chatCompletions && stream ? "{\"stream_options\":{\"include_usage\":true}," + body.dropFirst() : body
                    expected[eventID] = expectedCounts(api, upstreamBody: sent, maxTokens: 12)
                }
            }
        }
        let events = try events(atLeast: expected.count)
        XCTAssertEqual(Set(events.keys), Set(expected.keys), "exactly one event per call")
        for (id, counts) in expected {
            guard let event = events[id] else { continue }
            XCTAssertEqual(self.counts(event), counts, id)
            XCTAssertEqual(event.subject, "gw-alice")
            XCTAssertEqual(event.feature, "support-bot")
            XCTAssertNil(event.properties["incomplete"])
            XCTAssertEqual(event.properties["status"], "success")
            XCTAssertNil(event.properties["attempt"], "no SDK retry header, no attempt")
            // The service tier each API reports: OpenAI's response field, Anthropic's usage member.
            XCTAssertEqual(event.properties["service_tier"], event.model.hasPrefix("claude") ? "standard" : "default", id)
            XCTAssertEqual(event.meters, [:], "no tools, no meters")
        }
        XCTAssertEqual(try upstreamCalls(), 24)
        let metrics = try metricsScrape()
        XCTAssertTrue(metrics.contains(#"tally_gateway_proxied_calls_total{api="messages"} 4"#), metrics)
        XCTAssertTrue(metrics.contains("tally_gateway_upstream_seconds"), metrics)
    }

    /// Tool calls and web searches each API reports, whole and streamed, become the standard
    /// meters of the call's one event, with its status and attempt (from the SDKs' retry header);
    /// the aggregator folds them into meter windows split by status.
    func testToolCallsAndWebSearchesAreMeteredWithTheCallsStatus() throws {
        try harness.tally(["meters", "apply", try MeterIntegrationTests.write("""
            meters:
              - { name: tool_calls, unit: call, aggregation: sum, dimensions: [status] }
              - { name: web_search_requests, unit: search, aggregation: sum, dimensions: [status] }
            """)])
        try startGateway()
        let key = try customerKey("gw-tools")
        let bodies: [GatewayAPI: (body: String, meters: [String: Int64])] = [
            .chatCompletions: (#"{"model":"gpt-4o","max_tokens":12,"stream":STREAM,"tools":[{"type":"function","function":{"name":"lookup"}},{"type":"function","function":{"name":"book"}}],"messages":[{"role":"user","content":"Book it"}]}"#,
                               ["tool_calls": 2]),
            .responses: (#"{"model":"gpt-4o","max_output_tokens":12,"stream":STREAM,"tools":[{"type":"web_search_preview"},{"type":"function","name":"lookup"}],"input":"Find it"}"#,
                         ["tool_calls": 1, "web_search_requests": 1]),
            .messages: (#"{"model":"claude-sonnet-4","max_tokens":12,"stream":STREAM,"tools":[{"type":"web_search_20250305","name":"web_search"},{"name":"lookup","input_schema":{}}],"messages":[{"role":"user","content":"Find it"}]}"#,
                        ["tool_calls": 1, "web_search_requests": 1]),
        ]
        var expected: [String: [String: Int64]] = [:]
        var tiers: [String: String] = [:]
        for (api, call) in bodies {
            for stream in [false, true] {
                let through = try calls(gatewayURL + api.path, key: key, body: call.body.replacingOccurrences(of: "STREAM", with: String(stream)),
                                        keyHeader: api == .messages ? "x-api-key" : "authorization", headers: ["x-stainless-retry-count: 1"])[0]
                XCTAssertEqual(through.status, 200, "\(api) stream=\(stream): \(through.body)")
                let id = try XCTUnwrap(through.headers["x-tally-event-id"])
                expected[id] = call.meters
                tiers[id] = api == .messages ? "standard" : "default"
            }
        }
        // A call at the priority tier says so, for price rules on `service_tier`.
        let priority = try calls(gatewayURL + "/v1/responses", key: key, body: #"{"model":"gpt-4o","max_output_tokens":12,"service_tier":"priority","input":"Hi"}"#,
                                 headers: ["x-stainless-retry-count: 1"])[0]
        XCTAssertEqual(priority.status, 200, priority.body)
        let priorityID = try XCTUnwrap(priority.headers["x-tally-event-id"])
        expected[priorityID] = [:]
        tiers[priorityID] = "priority"
        let failed = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body(.chatCompletions, stream: false), headers: ["X-Fake-Fault: error-500"])[0]
        XCTAssertEqual(failed.status, 500)
        let events = try events(atLeast: expected.count)
        XCTAssertEqual(Set(events.keys), Set(expected.keys))
        for (id, meters) in expected {
            XCTAssertEqual(events[id]?.meters, meters, id)
            XCTAssertEqual(events[id]?.properties["status"], "retry", "a second attempt that succeeded")
            XCTAssertEqual(events[id]?.properties["attempt"], "2")
            XCTAssertEqual(events[id]?.properties["service_tier"], tiers[id], id)
        }
        // Its own group: the harness's is the rater group the gateway's credit check reads.
        let aggregator = try harness.startAggregator(["--group", harness.group + "-aggregator"])
        // The gateway wrote the records, so the harness knows no log end: wait for the keys.
        XCTAssertTrue(try TestStack.eventually { try harness.connection.query("SELECT count(*) FROM tally.usage_event_keys").scalar == String(expected.count) },
                      aggregator.log)
        // Two tool calls per chat completion, one per responses and messages call: (2 + 1 + 1) × 2.
        XCTAssertEqual(try harness.tally(["usage", "--meter", "tool_calls", "--granularity", "month", "--group-by", "status", "--format", "csv"])
                           .split(separator: "\n").dropFirst().map { $0.split(separator: ",").dropFirst().joined(separator: ",") },
                       ["gw-tools,retry,8"])
        XCTAssertTrue(try harness.tally(["usage", "--meter", "web_search_requests", "--granularity", "month", "--format", "csv"]).hasSuffix(",gw-tools,4\n"))
    }

    /// A stop-policy customer with nothing left gets 402 in the API's own error shape (what the
    /// OpenAI and Anthropic SDKs read), the problem details beside it; the upstream is never called.
    func testAnExhaustedWalletGets402AndNoUpstreamCall() throws {
        try harness.tally(["customers", "set", "gw-broke", "--overage", "stop"])
        try startGateway()
        let key = try customerKey("gw-broke")
        let before = try upstreamCalls()
        let refused = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body(.chatCompletions, stream: true), count: 3)
        for call in refused {
            XCTAssertEqual(call.status, 402, call.body)
            XCTAssertEqual(call.headers["content-type"], "application/json")
            let error = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(call.body.utf8)) as? [String: Any])?["error"] as? [String: Any], call.body)
            XCTAssertEqual(error["type"] as? String, "insufficient_quota")
            XCTAssertTrue((error["message"] as? String)?.hasPrefix("not enough prepaid credit for this call") ?? false, call.body)
            XCTAssertFalse((error["message"] as? String)?.contains("tally grant") ?? true, "the message is for the application's user")
            XCTAssertTrue(call.body.contains(#""title":"insufficient credit""#) && call.body.contains(#""customer":"gw-broke""#), call.body)
        }
        let anthropic = try calls(gatewayURL + "/v1/messages", key: key, body: body(.messages, stream: false), keyHeader: "x-api-key")[0]
        XCTAssertEqual(anthropic.status, 402, anthropic.body)
        let document = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(anthropic.body.utf8)) as? [String: Any], anthropic.body)
        XCTAssertEqual(document["type"] as? String, "error")
        XCTAssertEqual((document["error"] as? [String: Any])?["type"] as? String, "billing_error")
        XCTAssertEqual(try upstreamCalls(), before, "no upstream call for a refused customer")
        XCTAssertTrue(try events(atLeast: 0).isEmpty)
        XCTAssertTrue(try metricsScrape().contains(#"tally_gateway_refused_calls_total{api="chat_completions"} 3"#))
        XCTAssertTrue(try metricsScrape().contains(#"tally_gateway_refused_calls_total{api="messages"} 1"#))
        // A customer's key sends that customer's usage only.
        let other = try TallyIntegrationTests.http("POST", gatewayURL + "/v1/events", body: String(decoding: EventEncoder.encode(UsageEvent(
            id: "not-mine", source: "test", subject: "someone-else", time: EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1e6)),
            model: "gpt-4o", inputTokens: 1, outputTokens: 1)), as: UTF8.self), authorization: "Bearer \(key)")
        XCTAssertEqual(other.status, 400, other.body)
        XCTAssertTrue(other.body.contains("may only send events of customer"), other.body)
    }

    /// Issue #21: a caller that hangs up mid-stream no longer leaves the call unmetered. The
    /// vendor generates (and bills) the whole answer; OpenAI reports streamed usage only in the
    /// last chunk, so the gateway reads the upstream to its end and meters all 40 output tokens.
    func testACallerLeavingMidStreamIsStillMetered() throws {
        try startGateway()
        let key = try customerKey("gw-leaver")
        let body = body(.chatCompletions, stream: true, maxTokens: 40)
        let script = """
            import socket, struct, sys
            port, key, body = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer " + key.encode()
                      + b"\\r\\nContent-Type: application/json\\r\\nX-Fake-Fault: slow-stream\\r\\nContent-Length: "
                      + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
            first = s.recv(2000)
            assert first.startswith(b"HTTP/1.1 200"), first
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            """
        let port = String(gatewayURL.split(separator: ":").last ?? "")
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", script, port, key, body])
        XCTAssertEqual(status, 0, output)
        let events = try events(atLeast: 1)
        XCTAssertEqual(events.count, 1, gateway.log)
        let event = try XCTUnwrap(events.values.first)
        let sent = "{\"stream_options\":{\"include_usage\":true}," + body.dropFirst()
        XCTAssertEqual(counts(event), expectedCounts(.chatCompletions, upstreamBody: sent, maxTokens: 40))
        XCTAssertEqual(event.properties["caller_left"], "true")
        XCTAssertNil(event.properties["incomplete"], "the upstream finished")
    }

    /// Resident and peak resident memory of a process, in MiB (/proc/PID/status VmRSS, VmHWM).
    func memory(_ process: ChildProcess) throws -> (rss: Int, peak: Int) {
        let status = try String(contentsOfFile: "/proc/\(process.pid)/status", encoding: .utf8)
        func field(_ name: String) -> Int {
            let line = status.split(separator: "\n").first { $0.hasPrefix(name + ":") } ?? ""
            return (Int(line.split(separator: " ").dropFirst().first { !$0.isEmpty }.map(String.init) ?? "") ?? 0) / 1024
        }
        return (field("VmRSS"), field("VmHWM"))
    }

    /// Issue #21: memory from outside is bounded. 2,000 requests with different 65 KB bogus keys
    /// (each was cached) and two concurrent 30 MiB gateway requests (each parsed into a tree,
    /// 830 MB apiece) now cost tally-ingest what the bodies themselves take. Figures printed.
    func testHostileRequestsDoNotGrowMemory() throws {
        try startGateway()
        let port = String(gatewayURL.split(separator: ":").last ?? "")
        let start = try memory(gateway)
        let bogus = """
            import sys, threading, urllib.request, urllib.error
            port, count = sys.argv[1], int(sys.argv[2])
            def worker(first):
                for i in range(first, count, 8):
                    key = "k%06d" % i + "x" * 65000
                    req = urllib.request.Request("http://127.0.0.1:%s/v1/events" % port, data=b"{}", method="POST",
                                                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
                    try:
                        urllib.request.urlopen(req, timeout=30)
                    except urllib.error.HTTPError as error:
                        assert error.code in (401, 431), error.code
            threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
            [t.start() for t in threads]; [t.join() for t in threads]
            """
        let (bogusStatus, bogusOutput) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", bogus, port, "2000"])
        XCTAssertEqual(bogusStatus, 0, bogusOutput)
        let afterKeys = try memory(gateway)
        let key = try customerKey("gw-big")
        let big = """
            import sys, threading, urllib.request
            port, key = sys.argv[1], sys.argv[2]
            body = ('{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"' + "a" * (30 << 20) + '"}]}').encode()
            statuses = []
            def call():
                req = urllib.request.Request("http://127.0.0.1:%s/v1/chat/completions" % port, data=body, method="POST",
                                             headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
                statuses.append(urllib.request.urlopen(req, timeout=120).status)
            threads = [threading.Thread(target=call) for _ in range(2)]
            [t.start() for t in threads]; [t.join() for t in threads]
            assert statuses == [200, 200], statuses
            """
        let (bigStatus, bigOutput) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", big, port, key])
        XCTAssertEqual(bigStatus, 0, bigOutput)
        let afterBodies = try memory(gateway)
        print("tally-ingest memory (MiB): at start \(start.rss); after 2,000 bogus 65 KB keys \(afterKeys.rss) (peak \(afterKeys.peak)); "
              + "peak with two concurrent 30 MiB gateway requests \(afterBodies.peak), after them \(afterBodies.rss)")
        XCTAssertLessThan(afterKeys.rss - start.rss, 40, "bogus keys are not kept")
        // Each request's body, the copy sent upstream and the client's copy: about 4 × 30 MiB a call.
        XCTAssertLessThan(afterBodies.peak - afterKeys.rss, 400, "the bodies, not trees of them")
    }

    /// Issue #21: an upstream URL with credentials in it is never echoed, in a 502 or in the log.
    func testUpstreamCredentialsAreNeverEchoed() throws {
        gateway = try ChildProcess(TestStack.executable("tally-ingest"), [
            "--port", "0", "--host", "127.0.0.1", "--topic", harness.topic, "--database-url", harness.databaseURL,
            "--openai-upstream", "http://proxy-user:proxy-secret@127.0.0.1:1", "--rater-group", harness.group,
        ])
        gatewayURL = try gateway.listeningURL()
        let call = try calls(gatewayURL + "/v1/chat/completions", key: try customerKey("gw-creds"), body: body(.chatCompletions, stream: false))[0]
        XCTAssertEqual(call.status, 502, call.body)
        XCTAssertTrue(call.body.contains("http://***@127.0.0.1:1"), call.body)
        XCTAssertFalse(call.body.contains("proxy-secret") || gateway.log.contains("proxy-secret"), call.body + gateway.log)
    }

    /// A key that names no customer may name one in the trusted header, or is refused.
    func testATrustedHeaderNamesTheCustomerOfAnApplicationKey() throws {
        try harness.tally(["customers", "set", "gw-header-broke", "--overage", "stop"])
        try startGateway(["--customer-header", "X-Customer"])
        // Issue #21: naming who pays is a permission of its own.
        let plain = try harness.createKey()
        let refused = try calls(gatewayURL + "/v1/chat/completions", key: plain, body: body(.chatCompletions, stream: false),
                                headers: ["X-Customer: gw-header-paying"])[0]
        XCTAssertEqual(refused.status, 403, refused.body)
        XCTAssertTrue(refused.body.contains("--names-customers"), refused.body)
        let key = try harness.createKey(["--names-customers"])
        let anonymous = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body(.chatCompletions, stream: false))[0]
        XCTAssertEqual(anonymous.status, 403, anonymous.body)
        XCTAssertTrue(anonymous.body.contains("X-Customer"), anonymous.body)
        let named = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body(.chatCompletions, stream: false),
                              headers: ["X-Customer: gw-header-paying"])[0]
        XCTAssertEqual(named.status, 200, named.body)
        let received = try XCTUnwrap(named.headers["x-received-headers"]).split(separator: ",")
        XCTAssertFalse(received.contains("x-customer"), "whom a call is for stays with Tally: \(received)")
        XCTAssertTrue(received.contains("authorization"), "the upstream key is sent: \(received)")
        let broke = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body(.chatCompletions, stream: false),
                              headers: ["X-Customer: gw-header-broke"])[0]
        XCTAssertEqual(broke.status, 402, "the header's customer is the one checked: \(broke.body)")
        let events = try events(atLeast: 1)
        XCTAssertEqual(events.values.map(\.subject), ["gw-header-paying"])
    }

    /// Issue #20: a stop-policy customer with 0.01 of credit makes ten calls of ~5,000 tokens to a
    /// model no price book prices. Held at the default 75.00 per 1M tokens, the first call (5,050
    /// tokens: 0.37875) uses the credit up: it is answered, the other nine are refused, and they stay
    /// refused once the rater has kept the call's usage aside as unpriced. With
    /// --refuse-unpriced-models the refusal names the model.
    func testUnpricedModelsAreNotFreeUnderAStopPolicy() async throws {
        try harness.tally(["customers", "set", "gw-penny", "--overage", "stop"])
        try await harness.publish([RaterIntegrationTests.grant("gw-penny-1", customer: "gw-penny", amount: "0.01",
                                                               time: EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1e6) - 60_000_000).text)])
        let rater = try harness.startRater(["--batch-size", "10"])
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        try startGateway()
        let key = try customerKey("gw-penny")
        let before = try upstreamCalls()
        // The fake upstream reports 10 + body bytes / 8 input tokens: about 5,000 for a 40,000-byte prompt.
        let prompt = String(repeating: "word ", count: 7_980)
        let unpriced = #"{"model":"model-nobody-prices","max_tokens":40,"messages":[{"role":"user","content":"\#(prompt)"}]}"#
        let results = try calls(gatewayURL + "/v1/chat/completions", key: key, body: unpriced, count: 10)
        XCTAssertEqual(results.map(\.status), [200] + Array(repeating: 402, count: 9), results.map(\.body).joined(separator: "\n").suffix(2000).description)
        XCTAssertEqual(try upstreamCalls(), before + 1)
        // The rater keeps the call aside as unpriced (not debited); it still counts against the credit.
        XCTAssertTrue(try TestStack.eventually { try harness.connection.query("SELECT count(*) FROM tally.unpriced_usage WHERE customer_id = 'gw-penny'").int64(0, 0) == 1 })
        let later = try calls(gatewayURL + "/v1/chat/completions", key: key, body: unpriced)[0]
        XCTAssertEqual(later.status, 402, later.body)
        XCTAssertEqual(try upstreamCalls(), before + 1)
        gateway.signal(SIGKILL)
        gateway.wait()
        try startGateway(["--refuse-unpriced-models"])
        let refused = try calls(gatewayURL + "/v1/chat/completions", key: key, body: unpriced)[0]
        XCTAssertEqual(refused.status, 402, refused.body)
        XCTAssertTrue(refused.body.contains("calls to model-nobody-prices cannot be billed yet"), refused.body)
        XCTAssertEqual(try upstreamCalls(), before + 1)
    }

    /// 50 concurrent calls on a wallet that holds a few calls' worth: some go through, the rest
    /// get 402, and once the rater has debited them all the balance is at most one estimate below zero.
    func testFiftyConcurrentCallsOvershootByAtMostOneEstimate() async throws {
        let book = FileManager.default.temporaryDirectory.appendingPathComponent(TestStack.unique("gw-prices") + ".yaml")
        try """
            book: default
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            models:
              - { model: gpt-4o, input: "1000.00", output: "2000.00" }
            """.write(to: book, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: book) }
        try harness.tally(["pricing", "apply", book.path])
        try harness.tally(["customers", "set", "gw-small", "--overage", "stop"])
        try await harness.publish([RaterIntegrationTests.grant("gw-grant-1", customer: "gw-small", amount: "0.50",
                                                               time: EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1e6) - 60_000_000).text)])
        let rater = try harness.startRater(["--batch-size", "10"])
        XCTAssertTrue(try harness.waitUntilConsumed(), rater.log)
        try startGateway()
        let key = try customerKey("gw-small")
        let body = body(.chatCompletions, stream: false, maxTokens: 20)
        // 0.001 per input token (a token per 4 bytes estimated), 0.002 per output token, in nano-units.
        let estimate = Int64((body.utf8.count + 3) / 4) * 1_000_000 + 20 * 2_000_000
        let results = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body, count: 50, concurrency: 50)
        let admitted = results.filter { $0.status == 200 }
        let refused = results.filter { $0.status == 402 }
        XCTAssertEqual(admitted.count + refused.count, 50, results.map { "\($0.status) \($0.error ?? "")" }.joined(separator: ", "))
        XCTAssertGreaterThan(admitted.count, 0)
        XCTAssertGreaterThan(refused.count, 0)
        XCTAssertLessThanOrEqual(admitted.count, Int(500_000_000 / ((10 + Int64(body.utf8.count / 8)) * 1_000_000 + 40_000_000)) + 1)
        // The rater debits every admitted call; then the balance is what the calls cost, exactly.
        let debited = try TestStack.eventually(timeout: .seconds(60)) {
            // The grant and each admitted call: the rater's keys of the customer.
            try harness.connection.query("SELECT count(*) FROM tally.rater_event_keys WHERE customer_id = 'gw-small'").int64(0, 0) == Int64(admitted.count) + 1
        }
        let ledger = try harness.connection.query("""
            SELECT kind, count(*), sum(amount_nanos) FROM tally.wallet_ledger GROUP BY 1
            UNION ALL SELECT 'overage', sum(entries), sum(amount_nanos) FROM tally.wallet_overage
            """).rows
        XCTAssertTrue(debited, "\(admitted.count) calls admitted; ledger: \(ledger)\n\(rater.log.suffix(3000))")
        let balance = try XCTUnwrap(try harness.connection.query("SELECT balance_nanos FROM tally.wallets WHERE customer_id = 'gw-small'").int64(0, 0))
        let perCall = (10 + Int64(body.utf8.count / 8)) * 1_000_000 + 20 * 2_000_000
        XCTAssertEqual(balance, 500_000_000 - Int64(admitted.count) * perCall)
        XCTAssertGreaterThanOrEqual(balance, -estimate, "overshoot beyond one estimate: \(balance) < -\(estimate)")
        // With the debits in the balance, the holds are gone: one more call is refused for the balance itself.
        let after = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body)
        XCTAssertEqual(after.first?.status, balance > 0 ? 200 : 402)
    }

    /// A team's token budget, enforced: 50 concurrent calls of the team pass its limit by less
    /// than one call's estimate once the rater has counted them all; the rest get 429 in the
    /// API's own error shape, naming the budget and when it resets; another team's calls and
    /// `/v1/check` agree. Declared through the API with a grants key, as an application would.
    func testATeamBudgetRefusesAtTheGatewayWithinOneEstimate() async throws {
        try startGateway()
        let admin = try harness.createKey(["--grants"])
        let declared = try http("PUT", gatewayURL + "/v1/customers/gw-team/budgets/search-daily",
                                body: #"{"period": "day", "measure": "tokens", "limit": "500", "dimensions": {"team": "search"}}"#,
                                authorization: "Bearer \(admin)")
        XCTAssertEqual(declared.status, 202, declared.body)
        let rater = try harness.startRater(["--batch-size", "10"])
        // The declaration is counted from the log; the guard reads budgets again within 2 s.
        XCTAssertTrue(try TestStack.eventually { try harness.connection.query("SELECT count(*) FROM tally.budgets").scalar == "1" }, rater.log)
        try await Task.sleep(for: .seconds(2.5))
        let key = try customerKey("gw-team")
        let body = body(.chatCompletions, stream: false, maxTokens: 20)
        // The fake upstream uses 10 + bytes/8 input tokens and min(max_tokens, 40) output; the
        // gateway estimates input at a token per 4 bytes (rounded up) plus max_tokens.
        let perCall = 10 + Int64(body.utf8.count / 8) + 20
        let estimate = Int64((body.utf8.count + 3) / 4) + 20
        let upstreamBefore = try upstreamCalls()
        let results = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body, count: 50, concurrency: 50, headers: ["x-tally-property-team: search"])
        let admitted = results.filter { $0.status == 200 }
        let refused = results.filter { $0.status == 429 }
        XCTAssertEqual(admitted.count + refused.count, 50, results.map { "\($0.status) \($0.body)" }.joined(separator: "\n"))
        XCTAssertGreaterThan(admitted.count, 0)
        XCTAssertGreaterThan(refused.count, 0)
        let error = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(refused[0].body.utf8)) as? [String: Any])?["error"] as? [String: Any], refused[0].body)
        XCTAssertEqual(error["type"] as? String, "rate_limit_exceeded")
        XCTAssertTrue((error["message"] as? String)?.hasPrefix("the budget search-daily (500 tokens a day for team=search) is used up until ") ?? false, refused[0].body)
        XCTAssertTrue(refused[0].body.contains(#""budget":"search-daily""#) && refused[0].body.contains(#""resets_at":""#), refused[0].body)
        XCTAssertNotNil(refused[0].headers["retry-after"], "\(refused[0].headers)")
        // Once the rater has counted every admitted call: past the limit by less than one estimate.
        func used() throws -> Int64 { try harness.connection.query("SELECT coalesce(sum(used), 0) FROM tally.budget_usage").int64(0, 0) ?? 0 }
        XCTAssertTrue(try TestStack.eventually { try used() == Int64(admitted.count) * perCall }, "\((try? used()) ?? 0) \(rater.log.suffix(2000))")
        XCTAssertLessThan(try used() - 500, estimate, "\(admitted.count) calls of \(perCall) tokens, estimate \(estimate)")
        // Refused calls never reached the upstream, and the refusals are counted.
        XCTAssertEqual(try upstreamCalls(), upstreamBefore + admitted.count)
        XCTAssertTrue(try metricsScrape().contains("tally_budget_refusals_total{route=\"gateway\"} \(refused.count)"))
        // Another team's calls are under no budget.
        XCTAssertEqual(try calls(gatewayURL + "/v1/chat/completions", key: key, body: body, headers: ["x-tally-property-team: ads"]).first?.status, 200)
        // /v1/check answers the same for the search team, with where the budget stands.
        let check = try http("POST", gatewayURL + "/v1/check", body: #"{"customer": "gw-team", "dimensions": {"team": "search"}, "tokens": 10}"#,
                             authorization: "Bearer \(key)")
        XCTAssertEqual(check.status, 200, check.body)
        let answer = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(check.body.utf8)) as? [String: Any])
        XCTAssertEqual(answer["allowed"] as? Bool, try used() >= 500 ? false : true, check.body)
        let standing = try XCTUnwrap((answer["budgets"] as? [[String: Any]])?.first, check.body)
        XCTAssertEqual(standing["used"] as? String, String(try used()))
        XCTAssertEqual(standing["limit"] as? String, "500")
        // A customer's key checks its own customer only.
        XCTAssertEqual(try http("POST", gatewayURL + "/v1/check", body: #"{"customer": "someone-else", "tokens": 1}"#, authorization: "Bearer \(key)").status, 403)
    }

    /// Upstream failures: errors pass back unchanged and meter nothing; a stream that used tokens
    /// before failing or breaking off is metered by what it reported; a timeout is a 504.
    func testUpstreamFailuresAreMeteredByWhatTheyUsed() throws {
        try startGateway(["--upstream-timeout-seconds", "1"])
        let key = try customerKey("gw-faults")
        let chat = body(.chatCompletions, stream: false)
        for (fault, status) in [("error-500", 500), ("error-429", 429)] {
            let through = try calls(gatewayURL + "/v1/chat/completions", key: key, body: chat, headers: ["X-Fake-Fault: \(fault)"])[0]
            let straight = try calls(upstreamURL + "/v1/chat/completions", key: "sk-upstream", body: chat, headers: ["X-Fake-Fault: \(fault)"])[0]
            XCTAssertEqual(through.status, status)
            XCTAssertEqual(through.body, straight.body)
        }
        let slow = try calls(gatewayURL + "/v1/chat/completions", key: key, body: chat, headers: ["X-Fake-Fault: slow"])[0]
        XCTAssertEqual(slow.status, 504, slow.body)
        XCTAssertTrue(slow.body.contains("upstream timed out"), slow.body)

        let messages = body(.messages, stream: true)
        // Overloaded mid-stream: input and the output so far were used.
        let overloaded = try calls(gatewayURL + "/v1/messages", key: key, body: messages, keyHeader: "x-api-key", headers: ["X-Fake-Fault: error-event"])[0]
        XCTAssertEqual(overloaded.status, 200)
        XCTAssertTrue(overloaded.body.contains("overloaded_error"), overloaded.body)
        // The connection dropped after message_start: the input was used.
        let cut = try calls(gatewayURL + "/v1/messages", key: key, body: messages, keyHeader: "x-api-key", headers: ["X-Fake-Fault: cut-stream"])[0]
        XCTAssertNotNil(cut.error, "a broken-off stream must not look complete to the caller")
        // An OpenAI stream cut before its usage chunk reports nothing: not metered, counted.
        let cutChat = try calls(gatewayURL + "/v1/chat/completions", key: key, body: body(.chatCompletions, stream: true), headers: ["X-Fake-Fault: cut-stream"])[0]
        XCTAssertNotNil(cutChat.error)

        let events = try events(atLeast: 2)
        XCTAssertEqual(events.count, 2, "\(events.values.map(\.id))")
        let input = 10 + Int64(messages.utf8.count / 8)
        let byOutput = Dictionary(uniqueKeysWithValues: events.values.map { ($0.outputTokens, $0) })
        let erred = try XCTUnwrap(byOutput[7], "\(events)")
        XCTAssertEqual(counts(erred), TokenCounts(input: input, output: 7, cacheRead: 4, cacheWrite: 2))
        XCTAssertEqual(erred.properties["incomplete"], "true")
        XCTAssertEqual(erred.properties["status"], "error", "the stream reported an error")
        let broken = try XCTUnwrap(byOutput[1], "\(events)")
        XCTAssertEqual(counts(broken), TokenCounts(input: input, output: 1, cacheRead: 4, cacheWrite: 2))
        XCTAssertEqual(broken.properties["incomplete"], "true")
        XCTAssertEqual(broken.properties["status"], "cancelled", "the stream broke off")
        let metrics = try metricsScrape()
        XCTAssertTrue(metrics.contains(#"tally_gateway_upstream_errors_total{api="chat_completions",kind="timeout"} 1"#), metrics)
        XCTAssertTrue(metrics.contains(#"tally_gateway_unmetered_calls_total{api="chat_completions"} 3"#), metrics)
    }
}
