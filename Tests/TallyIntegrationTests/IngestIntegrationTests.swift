import Foundation
import TallyCore
import TallyKafka
import XCTest

/// The real tally-ingest against the real broker.
final class IngestIntegrationTests: XCTestCase {
    var topic: String!
    var ingest: ChildProcess!
    var base: String!
    var key: String!

    /// Creates an API key with the real CLI; returns the key.
    func createKey(_ extra: [String] = []) throws -> String {
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"), ["keys", "create", "--name", "test"] + extra)
        XCTAssertEqual(status, 0, output)
        return try XCTUnwrap(output.split(separator: "\n").first { $0.hasPrefix("tally_") }.map(String.init), output)
    }

    func start(_ extra: [String] = []) throws {
        key = try createKey()
        topic = TestStack.unique("test.ingest")
        let admin = try KafkaAdmin(configuration: KafkaConfiguration(brokers: try TestStack.brokers), logger: TestStack.logger)
        try admin.createTopic(topic, partitions: 4)
        ingest = try ChildProcess(TestStack.executable("tally-ingest"), ["--port", "0", "--host", "127.0.0.1", "--topic", topic] + extra)
        base = try ingest.listeningURL()
    }

    /// An authenticated request with this test's key.
    func http(_ method: String, _ url: String, contentType: String = "application/json", body: String? = nil,
          authorization: String? = nil, headers extraHeaders: [String: String] = [:]) throws -> HTTPResponse {
        try TallyIntegrationTests.http(method, url, contentType: contentType, body: body, authorization: "Bearer \(key!)", headers: extraHeaders)
    }

    override func tearDown() {
        ingest?.signal(SIGKILL)
        ingest?.wait()
    }

    func event(_ id: String, customer: String = "cust-a", input: Int64 = 10, minutesAgo: Int64 = 1) -> UsageEvent {
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        return UsageEvent(id: id, source: "test", subject: customer, time: EventTime(microseconds: now - minutesAgo * 60_000_000),
                          model: "gpt-4o", provider: "openai", inputTokens: input, outputTokens: 3)
    }

    func text(_ event: UsageEvent) -> String { String(decoding: EventEncoder.encode(event), as: UTF8.self) }

    /// Everything in the test topic: (key, value) per record.
    func topicContents(expect count: Int) throws -> [(key: String, value: String, partition: Int32)] {
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: try TestStack.brokers), groupID: nil, logger: TestStack.logger)
        try consumer.assign(Dictionary(uniqueKeysWithValues: (0..<4).map { (TopicPartition(topic, Int32($0)), KafkaOffset.beginning) }))
        var records: [ConsumerRecord] = []
        _ = TestStack.eventually(timeout: .seconds(15)) {
            records += consumer.poll(maxRecords: 1000, timeout: .milliseconds(200))
            return records.count >= count
        }
        // A little longer, to see anything that should not be there.
        records += consumer.poll(maxRecords: 1000, timeout: .milliseconds(500))
        consumer.close()
        return records.map { (String(decoding: $0.key ?? [], as: UTF8.self), String(decoding: $0.value ?? [], as: UTF8.self), $0.partition) }
    }

    func testSingleBatchNDJSONAndProviderRequestsLandInTheTopicAsValidated() throws {
        try start()
        let single = event("single-1")
        var response = try http("POST", base + "/v1/events", contentType: "application/cloudevents+json", body: text(single))
        XCTAssertEqual(response.status, 202, response.body)
        XCTAssertTrue(response.body.contains(#""status":"accepted""#), response.body)

        let batch = [event("batch-1", customer: "cust-b"), event("batch-2", customer: "cust-c")]
        var invalid = text(event("batch-bad"))
        invalid = invalid.replacingOccurrences(of: #""input_tokens":10"#, with: #""input_tokens":-10"#)
        response = try http("POST", base + "/v1/events", contentType: "application/json",
                            body: "[" + text(batch[0]) + "," + invalid + "," + text(batch[1]) + "," + text(batch[0]) + "]")
        XCTAssertEqual(response.status, 202, response.body)
        XCTAssertTrue(response.body.contains(#"{"index":1,"status":"rejected","errors":[{"field":"data.input_tokens""#), response.body)
        XCTAssertTrue(response.body.contains(#"{"index":3,"status":"duplicate_in_request","first_index":0}"#), response.body)

        let lines = [event("nd-1", customer: "cust-d"), event("nd-2", customer: "cust-d")].map(text).joined(separator: "\n") + "\n{oops\n"
        response = try http("POST", base + "/v1/events", contentType: "application/x-ndjson", body: lines)
        XCTAssertEqual(response.status, 202, response.body)
        XCTAssertTrue(response.body.contains(#""accepted":2,"rejected":1"#), response.body)

        let now = EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000)).text
        response = try http("POST", base + "/v1/usage/anthropic", contentType: "application/json", body: """
            {"id":"prov-1","customer":"cust-e","model":"claude-sonnet-4","time":"\(now)","feature":"chat",
             "usage":{"input_tokens":21,"cache_creation_input_tokens":1000,"cache_read_input_tokens":500,"output_tokens":393}}
            """)
        XCTAssertEqual(response.status, 202, response.body)
        response = try http("POST", base + "/v1/usage/gemini", contentType: "application/json",
                            body: #"{"id":"prov-2","customer":"cust-e","model":"gemini","time":"\#(now)","usage":{"promptTokenCount":-4}}"#)
        XCTAssertEqual(response.status, 400, response.body)
        XCTAssertTrue(response.body.contains("usage.promptTokenCount"), response.body)

        let records = try topicContents(expect: 6)
        XCTAssertEqual(records.count, 6, "1 single + 2 batch + 2 NDJSON + 1 provider, nothing rejected or repeated")
        let byID = Dictionary(uniqueKeysWithValues: records.map { record -> (String, (key: String, value: String, partition: Int32)) in
            guard case .usage(let decoded)? = try? EventDecoder.decode(record.value).get() else { return ("?", record) }
            return (decoded.id, record)
        })
        XCTAssertEqual(Set(byID.keys), ["single-1", "batch-1", "batch-2", "nd-1", "nd-2", "prov-1"])
        XCTAssertEqual(byID["single-1"]?.value, text(single), "published exactly as sent")
        for (id, record) in byID {
            guard case .usage(let decoded) = try EventDecoder.decode(record.value).get() else { continue }
            XCTAssertEqual(record.key, decoded.subject, "\(id) is keyed by its customer")
        }
        XCTAssertEqual(byID["nd-1"]?.partition, byID["nd-2"]?.partition, "one customer, one partition")
        guard case .usage(let anthropic) = try EventDecoder.decode(byID["prov-1"]!.value).get() else { return XCTFail() }
        XCTAssertEqual([anthropic.inputTokens, anthropic.cacheWriteInputTokens, anthropic.cacheReadInputTokens, anthropic.outputTokens],
                       [1521, 1000, 500, 393], "Anthropic input excludes cache reads and writes; Tally's includes them")
        XCTAssertEqual(anthropic.provider, "anthropic")
    }

    /// CloudEvents HTTP binary mode (what the CloudEvents SDK's to_binary sends): attributes in ce-
    /// headers, the body is the data. Accepted as its structured equivalent; errors name the header.
    func testBinaryModeCloudEventsAreAccepted() throws {
        try start()
        let time = EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000) - 60_000_000).text
        let headers = ["ce-specversion": "1.0", "ce-id": "binary-http-1", "ce-source": "app%3A%2F%2Fsdk", "ce-type": "llm.usage",
                       "ce-subject": "cust-binary", "ce-time": time]
        let data = #"{"model":"gpt-4o","input_tokens":120,"output_tokens":30}"#
        let accepted = try http("POST", base + "/v1/events", contentType: "application/json", body: data, headers: headers)
        XCTAssertEqual(accepted.status, 202, accepted.body)
        var missing = headers
        missing["ce-subject"] = nil
        let refused = try http("POST", base + "/v1/events", contentType: "application/json", body: data, headers: missing)
        XCTAssertEqual(refused.status, 400, refused.body)
        XCTAssertTrue(refused.body.contains(#""field":"ce-subject""#) && refused.body.contains("HTTP binary-mode CloudEvent"), refused.body)
        let text = try http("POST", base + "/v1/events", contentType: "text/plain", body: "hello", headers: headers)
        XCTAssertEqual(text.status, 400, text.body)
        XCTAssertTrue(text.body.contains("with data of type text/plain"), text.body)
        let records = try topicContents(expect: 1)
        XCTAssertEqual(records.count, 1)
        guard case .usage(let event)? = try? EventDecoder.decode(Array(records[0].value.utf8)).get() else { return XCTFail(records[0].value) }
        XCTAssertEqual(event.source, "app://sdk", "header values are percent-decoded")
        XCTAssertEqual(event.inputTokens, 120)
        XCTAssertEqual(records[0].key, "cust-binary")
    }

    func testRequestErrors() throws {
        try start(["--max-body-bytes", "4000", "--max-batch-events", "3"])
        var response = try http("POST", base + "/v1/events", contentType: "application/json", body: #"{"specversion": "1.0", "id": }"#)
        XCTAssertEqual(response.status, 400)
        XCTAssertTrue(response.body.contains(#""position":29"#), response.body)
        XCTAssertTrue(response.contentType.hasPrefix("application/problem+json"))

        response = try http("POST", base + "/v1/events", contentType: "application/json", body: String(repeating: " ", count: 5000) + "{}")
        XCTAssertEqual(response.status, 413, "body limit before parsing")

        let four = (1...4).map { text(event("e\($0)")) }.joined(separator: ",")
        response = try http("POST", base + "/v1/events", contentType: "application/json", body: "[" + four + "]")
        XCTAssertEqual(response.status, 413, response.body)

        response = try http("POST", base + "/v1/events", contentType: "text/plain", body: text(event("x")))
        XCTAssertEqual(response.status, 415)

        response = try http("POST", base + "/v1/events", contentType: "application/json", body: text(event("old", minutesAgo: 60 * 24 * 40)))
        XCTAssertEqual(response.status, 400)
        XCTAssertTrue(response.body.contains(#""field":"time""#), response.body)

        response = try http("POST", base + "/v1/usage/nosuch", contentType: "application/json", body: "{}")
        XCTAssertEqual(response.status, 404)
        XCTAssertEqual(try topicContents(expect: 0).count, 0, "nothing rejected was written")
    }

    func testBrokerOutageAnswers503AndNeverClaimsAnUnwrittenEvent() throws {
        try start(["--delivery-timeout-ms", "2500"])
        XCTAssertEqual(try http("POST", base + "/v1/events", contentType: "application/json", body: text(event("before"))).status, 202)
        try TestStack.stack("broker-pause")
        let response: HTTPResponse
        do {
            defer { try? TestStack.stack("broker-resume") }
            response = try http("POST", base + "/v1/events", contentType: "application/json",
                                body: "[" + text(event("during-1")) + "," + text(event("during-2")) + "]")
        }
        XCTAssertEqual(response.status, 503, response.body)
        XCTAssertEqual(response.retryAfter, "5")
        // Both were sent on an open connection to a broker that stopped answering: they may be in the
        // log, so they are `unknown` (resend), never `not_written` (a promise they are not there).
        XCTAssertTrue(response.body.contains(#""not_written":0,"unknown":2"#), response.body)
        XCTAssertFalse(response.body.contains(#""status":"accepted""#), response.body)
        // Back up: accepted events are in the topic; resending the unwritten ones is safe (ids dedup).
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(30)) {
            try http("POST", base + "/v1/events", contentType: "application/json", body: text(event("after"))).status == 202
        })
        let ids = try topicContents(expect: 2).compactMap { record -> String? in
            guard case .usage(let decoded)? = try? EventDecoder.decode(record.value).get() else { return nil }
            return decoded.id
        }
        XCTAssertTrue(ids.contains("before") && ids.contains("after"), "\(ids)")
    }

    func testAPIKeysAreRequiredAndEnvironmentLimitsHold() throws {
        try start()
        let body = text(event("auth-1"))
        XCTAssertEqual(try TallyIntegrationTests.http("POST", base + "/v1/events", body: body).status, 401, "no key")
        XCTAssertEqual(try TallyIntegrationTests.http("POST", base + "/v1/events", body: body, authorization: "Bearer tally_nope").status, 401)
        let revoked = try createKey()
        let keyID = String(revoked.split(separator: "_")[1])
        XCTAssertEqual(try ChildProcess.run(TestStack.executable("tally"), ["keys", "revoke", keyID]).status, 0)
        XCTAssertEqual(try TallyIntegrationTests.http("POST", base + "/v1/events", body: body, authorization: "Bearer \(revoked)").status, 401)
        let list = try ChildProcess.run(TestStack.executable("tally"), ["keys", "list"]).output
        XCTAssertTrue(list.contains(keyID) && !list.contains(revoked), "list shows ids, never keys")

        let staging = try createKey(["--environment", "staging"])
        var production = event("env-1")
        production.environment = "production"
        var stagingEvent = event("env-2")
        stagingEvent.environment = "staging"
        let response = try TallyIntegrationTests.http("POST", base + "/v1/events", body: "[" + text(production) + "," + text(stagingEvent) + "]",
                                                      authorization: "Bearer \(staging)")
        XCTAssertEqual(response.status, 202, response.body)
        XCTAssertTrue(response.body.contains(#"{"index":0,"status":"rejected","errors":[{"field":"data.environment""#), response.body)
        XCTAssertTrue(response.body.contains(#""accepted":1"#), response.body)
        XCTAssertEqual(try http("POST", base + "/v1/events", body: body).status, 202, "a valid key works")
    }

    /// Credit is money: only a key made with --grants may post grants; the grant lands in the
    /// topic keyed by the customer as a valid tally.wallet.grant event; usage endpoints refuse grants.
    func testWalletGrantsNeedAGrantKeyAndLandInTheTopic() throws {
        try start()
        let grantKey = try createKey(["--grants"])
        let body = #"{"id":"grant-1","amount":"25.50","currency":"USD","priority":10,"source":"promotion","expires_at":"2099-01-01T00:00:00Z"}"#
        let forbidden = try http("POST", base + "/v1/wallets/acme/grants", body: body)
        XCTAssertEqual(forbidden.status, 403, forbidden.body)
        XCTAssertTrue(forbidden.body.contains("--grants"), forbidden.body)
        let accepted = try TallyIntegrationTests.http("POST", base + "/v1/wallets/acme/grants", body: body, authorization: "Bearer \(grantKey)")
        XCTAssertEqual(accepted.status, 202, accepted.body)
        XCTAssertTrue(accepted.body.contains(#""id":"grant-1","status":"accepted","amount":"25.50","currency":"USD""#), accepted.body)
        let invalid = try TallyIntegrationTests.http("POST", base + "/v1/wallets/acme/grants", body: #"{"id":"grant-2","amount":25.5,"currency":"usd","source":"gift"}"#,
                                                     authorization: "Bearer \(grantKey)")
        XCTAssertEqual(invalid.status, 400, invalid.body)
        for field in ["amount", "currency", "source"] { XCTAssertTrue(invalid.body.contains(#""field":"\#(field)""#), invalid.body) }
        // A grant sent as a usage event is refused at /v1/events.
        let asUsage = try http("POST", base + "/v1/events", body: #"{"specversion":"1.0","id":"g","source":"s","type":"tally.wallet.grant","subject":"acme","time":"2026-01-01T00:00:00Z","data":{"amount":"1","currency":"USD","source":"purchase"}}"#)
        XCTAssertEqual(asUsage.status, 400, asUsage.body)
        XCTAssertTrue(asUsage.body.contains("/v1/wallets/{customer}/grants"), asUsage.body)

        let records = try topicContents(expect: 1)
        XCTAssertEqual(records.count, 1, "only the accepted grant was written")
        XCTAssertEqual(records.first?.key, "acme")
        guard case .grant(let grant)? = try? EventDecoder.decode(Array(records[0].value.utf8)).get() else { return XCTFail(records[0].value) }
        XCTAssertEqual(grant.id, "grant-1")
        XCTAssertEqual(grant.amountNanos, 25_500_000_000)
        XCTAssertEqual(grant.grantSource, .promotion)
        XCTAssertEqual(grant.priority, 10)
    }

    func testEmitSendsAFileInBatchesAndSummarizes() throws {
        try start()
        let file = NSTemporaryDirectory() + "tally-emit-\(UInt32.random(in: 0...UInt32.max)).ndjson"
        defer { try? FileManager.default.removeItem(atPath: file) }
        let lines = (0..<2500).map { text(event("emit-\($0)", customer: "cust-\($0 % 7)")) } + [#"{"specversion":"1.0"}"#]
        try (lines.joined(separator: "\n") + "\n").write(toFile: file, atomically: true, encoding: .utf8)
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"), ["emit", file, "--ingest-url", base, "--api-key", key, "--batch-size", "400"])
        XCTAssertEqual(status, 1, "a rejected event makes emit fail: \(output)")
        XCTAssertTrue(output.contains("accepted 2500, rejected 1, duplicates in request 0, not written or unconfirmed 0"), output)
        XCTAssertTrue(output.contains("id: is required"), output)
        XCTAssertEqual(try topicContents(expect: 2500).count, 2500)
    }

    func testOpsEndpointsAndSigtermDrain() throws {
        try start()
        XCTAssertEqual(try http("GET", base + "/livez").status, 200)
        XCTAssertEqual(try http("GET", base + "/readyz").status, 200)
        _ = try http("POST", base + "/v1/events", contentType: "application/json", body: text(event("m1")))
        let metrics = try http("GET", base + "/metrics").body
        XCTAssertTrue(metrics.contains("tally_ingest_events_accepted_total 1"), metrics)
        XCTAssertTrue(metrics.contains("tally_ingest_produce_seconds_bucket"), metrics)
        ingest.signal(SIGTERM)
        XCTAssertEqual(ingest.wait(timeout: .seconds(30)), 0, ingest.log)
        XCTAssertTrue(ingest.log.contains("producer flushed"), ingest.log)
    }
}

struct HTTPResponse {
    let status: Int
    let contentType: String
    let retryAfter: String?
    let body: String
}

/// One HTTP request over loopback (Python's urllib: no HTTP client in the test's dependencies).
func http(_ method: String, _ url: String, contentType: String = "application/json", body: String? = nil,
          authorization: String? = nil, headers extraHeaders: [String: String] = [:]) throws -> HTTPResponse {
    let bodyFile = NSTemporaryDirectory() + "tally-http-\(UInt32.random(in: 0...UInt32.max))"
    try (body ?? "").write(toFile: bodyFile, atomically: true, encoding: .utf8)
    defer { try? FileManager.default.removeItem(atPath: bodyFile) }
    let script = """
        import sys, urllib.request, urllib.error
        import json
        method, url, ctype, path, has_body, auth, extra = sys.argv[1:8]
        data = open(path, 'rb').read() if has_body == '1' else None
        headers = {'Content-Type': ctype, **json.loads(extra)}
        if auth:
            headers['Authorization'] = auth
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            r = urllib.request.urlopen(req, timeout=30)
        except urllib.error.HTTPError as e:
            r = e
        print(r.status); print(r.headers.get('Content-Type', '')); print(r.headers.get('Retry-After', '')); sys.stdout.write(r.read().decode())
        """
    let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", script, method, url, contentType, bodyFile, body == nil ? "0" : "1", authorization ?? "",
                                                                     String(decoding: try JSONSerialization.data(withJSONObject: extraHeaders), as: UTF8.self)])
    let lines = output.split(separator: "\n", maxSplits: 3, omittingEmptySubsequences: false).map(String.init)
    guard status == 0, lines.count >= 3, let code = Int(lines[0]) else {
        throw NSError(domain: "http", code: Int(status), userInfo: [NSLocalizedDescriptionKey: output])
    }
    return HTTPResponse(status: code, contentType: lines[1], retryAfter: lines[2].isEmpty ? nil : lines[2], body: lines.count > 3 ? lines[3] : "")
}
