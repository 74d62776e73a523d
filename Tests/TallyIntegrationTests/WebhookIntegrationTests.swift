import Foundation
import TallyCore
import XCTest

/// Webhooks end to end: the real rater delivers its alerts to a local receiver that checks each
/// signature with the `standardwebhooks` PyPI package (as a user's receiver would), across an
/// outage of the receiver and a kill -9 of the rater, each message at least once under one id.
final class WebhookIntegrationTests: XCTestCase {
    /// An HTTP receiver on loopback: verifies each request with the endpoint's secret, appends
    /// what it got to a JSON-lines file and answers 204 (400 when the signature does not verify).
    static let receiver = #"""
        import json, sys
        from http.server import BaseHTTPRequestHandler, HTTPServer
        from standardwebhooks import Webhook, WebhookVerificationError
        port, secret, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        webhook = Webhook(secret)
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    webhook.verify(body, dict(self.headers.items()))
                    verified = True
                except WebhookVerificationError:
                    verified = False
                with open(out, "a") as f:
                    f.write(json.dumps({"path": self.path, "id": self.headers.get("webhook-id"), "verified": verified,
                                        "body": body.decode()}) + "\n")
                self.send_response(204 if verified else 400)
                self.end_headers()
            def log_message(self, *args):
                pass
        HTTPServer(("127.0.0.1", port), Handler).serve_forever()
        """#

    func testAlertsReachAReceiverSignedAcrossAnOutageAndAKill9() async throws {
        let harness = try AggregatorHarness()
        try RaterIntegrationTests.applyPrices(harness)
        try harness.tally(["customers", "set", "alice", "--low-balance", "5,1", "--auto-topup-below", "1", "--auto-topup-amount", "20", "--overage", "stop"])
        let port = try PrometheusIntegrationTests.freePort()
        let added = try harness.tally(["webhooks", "add", "http://127.0.0.1:\(port)/hooks", "--description", "test receiver"])
        let secret = try XCTUnwrap(added.split(separator: "\n").first { $0.hasPrefix("secret whsec_") }.map { String($0.dropFirst("secret ".count)) }, added)
        let endpoint = try XCTUnwrap(added.split(separator: "\n").first { $0.hasPrefix("endpoint ep_") }.map { String($0.dropFirst("endpoint ".count)) }, added)
        // Subscribed to invoices only: none of the alerts go there.
        _ = try harness.tally(["webhooks", "add", "http://127.0.0.1:\(port)/invoices", "--types", "invoice.closed"])
        // Refused: plain HTTP off the loopback interface, unknown types.
        let (plain, plainOutput) = try ChildProcess.run(TestStack.executable("tally"), ["webhooks", "add", "http://example.com/x", "--database-url", harness.databaseURL])
        XCTAssertNotEqual(plain, 0)
        XCTAssertTrue(plainOutput.contains("webhooks go to https:// URLs"), plainOutput)
        let (unknown, unknownOutput) = try ChildProcess.run(TestStack.executable("tally"), ["webhooks", "add", "https://example.com/x", "--types", "wallet.lost",
                                                                                            "--database-url", harness.databaseURL])
        XCTAssertNotEqual(unknown, 0)
        XCTAssertTrue(unknownOutput.contains("wallet.lost is not a message type"), unknownOutput)

        // As testLowBalanceAlertsFireOncePerCrossing: three crossings and one top-up request.
        let dollar = { (id: String, time: String) in
            ("alice", EventEncoder.encode(UsageEvent(id: id, source: "test", subject: "alice", time: EventTime(time)!, model: "gpt-4o",
                                                     inputTokens: 0, outputTokens: 100_000)))
        }
        var stream = [RaterIntegrationTests.grant("g1", customer: "alice", amount: "10", time: "2026-11-01T00:00:00Z")]
        for i in 1...10 { stream.append(dollar("u\(i)", "2026-11-02T00:00:0\(i % 10)Z")) }
        stream.append(RaterIntegrationTests.grant("topup-1", customer: "alice", amount: "20", time: "2026-11-03T00:00:00Z"))
        for i in 11...27 { stream.append(dollar("u\(i)", "2026-11-04T00:00:\(i)Z")) }
        try await harness.publish(stream)

        // The receiver is down: attempts fail and stay due.
        let options = ["--alerts-topic", "off", "--webhook-retry-seconds", "0.5", "--webhook-attempts", "100", "--webhook-timeout-seconds", "2"]
        let first = try harness.startRater(options)
        XCTAssertTrue(try harness.waitUntilConsumed(), first.log)
        func scalar(_ sql: String) throws -> String { try harness.connection.query(sql).scalar ?? "" }
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(60)) {
            (try? scalar("SELECT count(*) FROM tally.webhook_deliveries WHERE attempts >= 2 AND delivered_at IS NULL AND last_error IS NOT NULL")) == "4"
        }, first.log + ((try? harness.tally(["webhooks", "deliveries"])) ?? ""))
        XCTAssertEqual(try scalar("SELECT count(*) FROM tally.webhook_messages"), "4")
        XCTAssertEqual(try scalar("SELECT count(DISTINCT endpoint_id) FROM tally.webhook_deliveries"), "1", "only the endpoint of every type")
        // The endpoint's backlog shows in the rater's metrics (what TallyWebhookEndpointBehind watches).
        let backlogSample = "tally_webhook_oldest_pending_seconds{endpoint=\"\(endpoint)\"}"
        let behind = try MetricsScrape.waiting(port: try XCTUnwrap(first.opsPort, first.log)) { ($0.sample(backlogSample) ?? 0) >= 1 }
        XCTAssertGreaterThanOrEqual(behind.sample(backlogSample) ?? 0, 1, behind.text)
        first.signal(SIGKILL)
        XCTAssertEqual(first.wait(timeout: .seconds(10)), 128 + SIGKILL)

        // The receiver comes back, then the rater: every message arrives, signed.
        let received = NSTemporaryDirectory() + TestStack.unique("webhooks") + ".jsonl"
        defer { try? FileManager.default.removeItem(atPath: received) }
        let receiver = try ChildProcess("/usr/bin/env", ["python3", "-c", Self.receiver, String(port), secret, received])
        defer { receiver.signal(SIGKILL); receiver.wait() }  // SIGTERM may be ignored, inherited from the test runner
        let second = try harness.startRater(options)
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(60)) {
            (try? scalar("SELECT count(*) FROM tally.webhook_deliveries WHERE delivered_at IS NOT NULL")) == "4"
        }, second.log + receiver.log + ((try? harness.tally(["webhooks", "deliveries"])) ?? ""))
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) { second.opsPort != nil }, second.log)
        let caughtUp = try MetricsScrape.waiting(port: try XCTUnwrap(second.opsPort, second.log)) { $0.sample(backlogSample) == 0 }
        XCTAssertEqual(caughtUp.sample(backlogSample), 0, caughtUp.text)
        func lines() throws -> [[String: Any]] {
            try String(contentsOfFile: received, encoding: .utf8).split(separator: "\n").map {
                try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])
            }
        }
        let deliveries = try lines()
        XCTAssertTrue(deliveries.allSatisfy { $0["verified"] as? Bool == true && $0["path"] as? String == "/hooks" }, "\(deliveries)")
        let messageIDs = Set(try harness.connection.query("SELECT message_id FROM tally.webhook_messages").rows.compactMap { $0[0] })
        XCTAssertEqual(Set(deliveries.compactMap { $0["id"] as? String }), messageIDs)
        // The payloads: each alert's threshold and balance, and the request, as the tables have them.
        var seen: [String] = []
        for delivery in deliveries {
            let body = try XCTUnwrap(JSONSerialization.jsonObject(with: Data((delivery["body"] as? String ?? "").utf8)) as? [String: Any])
            let data = try XCTUnwrap(body["data"] as? [String: String], "\(body)")
            XCTAssertEqual(data["customer"], "alice")
            switch body["type"] as? String {
            case "wallet.low_balance": seen.append("low \(data["threshold"]!) \(data["balance"]!)")
            case "wallet.topup_requested": seen.append("topup \(data["below"]!) \(data["amount"]!) \(data["balance"]!)")
            default: XCTFail("unexpected \(body)")
            }
            // The id derives from what the message reports.
            let source = data["alert_id"] ?? data["request_id"]!
            XCTAssertEqual(delivery["id"] as? String, StandardWebhook.messageID(type: body["type"] as! String, sourceID: source,
                                                                                 payload: delivery["body"] as? String ?? ""))
        }
        XCTAssertEqual(Set(seen), ["low 5.00 4.00", "low 1.00 0.00", "topup 1.00 20.00 0.00"], "\(seen)")
        XCTAssertEqual(seen.filter { $0 == "low 5.00 4.00" }.count, 2, "two crossings of 5.00: two messages")

        // Re-sent by hand: the same id and the same bytes again.
        let resent = try XCTUnwrap(deliveries.first)
        let id = try XCTUnwrap(resent["id"] as? String)
        XCTAssertTrue(try harness.tally(["webhooks", "resend", id]).contains("1 delivery due now"))
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) { ((try? lines()) ?? []).filter { $0["id"] as? String == id }.count == 2 }, second.log)
        let again = try lines().last { $0["id"] as? String == id }
        XCTAssertEqual(again?["body"] as? String, resent["body"] as? String)
        XCTAssertTrue(try harness.tally(["webhooks", "list"]).contains(endpoint))
        second.signal(SIGTERM)
        XCTAssertEqual(second.wait(timeout: .seconds(30)), 0, second.log)
    }
}
