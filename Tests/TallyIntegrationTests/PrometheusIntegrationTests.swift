import Foundation
import TallyCore
import XCTest

/// The operator's view: the alert rules in deploy/prometheus/rules pass promtool, and a real
/// Prometheus (Debian's package) scraping a real tally-aggregator fires the rule a poison record
/// should fire.
final class PrometheusIntegrationTests: XCTestCase {
    static let rules = TestStack.root.appendingPathComponent("deploy/prometheus/rules").path

    /// `promtool check` of the rules and of both configurations, and `promtool test rules`: each
    /// alert fires on its situation, with its labels and text, and stays quiet beside it.
    func testRulesAndConfigurationsPassPromtool() throws {
        let check = try ChildProcess.run("/usr/bin/promtool", ["check", "rules", Self.rules + "/tally-alerts.yml"])
        XCTAssertEqual(check.status, 0, check.output)
        XCTAssertTrue(check.output.contains("SUCCESS: 20 rules found"), check.output)
        let test = try ChildProcess.run("/usr/bin/promtool", ["test", "rules", Self.rules + "/tally-alerts.test.yml"])
        XCTAssertEqual(test.status, 0, test.output)
        XCTAssertTrue(test.output.contains("SUCCESS"), test.output)
        // Compose's file names paths inside its container: its syntax is what can be checked here.
        let compose = try ChildProcess.run("/usr/bin/promtool", ["check", "config", "--syntax-only",
                                                                 TestStack.root.appendingPathComponent("deploy/prometheus/prometheus.yml").path])
        XCTAssertEqual(compose.status, 0, compose.output)
        // The local stack's, as `scripts/stack up` wrote it, whole (its rule file included).
        let stackDirectory = try XCTUnwrap(ProcessInfo.processInfo.environment["TALLY_STACK_DIR"], "run through scripts/test")
        let local = try ChildProcess.run("/usr/bin/promtool", ["check", "config", stackDirectory + "/prometheus/prometheus.yml"])
        XCTAssertEqual(local.status, 0, local.output)
        XCTAssertTrue(local.output.contains("SUCCESS: 20 rules found"), local.output)
    }

    /// A poison record reaching the log after Prometheus first saw the aggregator: the dead-letter
    /// counter (exported at zero from the start) rises, and TallyDeadLettersGrowing fires for its
    /// reason; the lag recording rule has the aggregator's series.
    func testPrometheusScrapesTheAggregatorAndADeadLetterFiresItsAlert() async throws {
        let harness = try AggregatorHarness()
        try await harness.publish(AggregatorHarness.events(count: 20, seed: 5))
        let aggregator = try harness.startAggregator()
        XCTAssertTrue(try harness.waitUntilConsumed(), aggregator.log)
        let opsPort = try XCTUnwrap(aggregator.opsPort, aggregator.log)

        let directory = NSTemporaryDirectory() + TestStack.unique("prometheus")
        try FileManager.default.createDirectory(atPath: directory + "/data", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let port = try Self.freePort()
        try """
            global: { scrape_interval: 1s, evaluation_interval: 1s }
            rule_files: ["\(Self.rules)/tally-alerts.yml"]
            scrape_configs:
              - job_name: tally-aggregator
                static_configs: [{ targets: ["127.0.0.1:\(opsPort)"] }]
            """.write(toFile: directory + "/prometheus.yml", atomically: true, encoding: .utf8)
        let prometheus = try ChildProcess("/usr/bin/prometheus", ["--config.file=\(directory)/prometheus.yml", "--storage.tsdb.path=\(directory)/data",
                                                                  "--web.listen-address=127.0.0.1:\(port)"])
        defer { prometheus.signal(SIGTERM); prometheus.wait() }
        let api = "http://127.0.0.1:\(port)/api/v1/query?query="
        func query(_ expression: String) throws -> [[String: Any]] {
            let encoded = try XCTUnwrap(expression.addingPercentEncoding(withAllowedCharacters: .alphanumerics))
            let body = try httpGet(api + encoded).body
            let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any], body)
            let data = try XCTUnwrap(json["data"] as? [String: Any], body)
            return try XCTUnwrap(data["result"] as? [[String: Any]], body)
        }
        func value(_ sample: [String: Any]) -> Double? { ((sample["value"] as? [Any])?.last as? String).flatMap(Double.init) }

        // Scraped, and the counter is there at zero before any dead letter.
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(60)) {
            (try? query(#"tally_aggregator_dead_letters_total{reason="malformed_json"}"#))?.first.flatMap(value) == 0
        }, prometheus.log)
        XCTAssertEqual(try query(#"up{job="tally-aggregator"}"#).first.flatMap(value), 1)
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) {
            (try? query(#"tally:consumer_lag_records:sum{job="tally-aggregator"}"#))?.first.flatMap(value) == 0
        }, "the lag recording rule has the caught-up aggregator")
        XCTAssertEqual(try query(#"ALERTS{alertname="TallyDeadLettersGrowing"}"#).count, 0)

        try await harness.publish([("cust-1", Array("not an event".utf8))])
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(60)) {
            let alerts = (try? query(#"ALERTS{alertname="TallyDeadLettersGrowing",alertstate="firing"}"#)) ?? []
            return alerts.contains { ($0["metric"] as? [String: String])?["reason"] == "malformed_json" }
        }, prometheus.log + aggregator.log)
        // One alert per reason: nothing else was dead-lettered.
        XCTAssertEqual(try query(#"ALERTS{alertname="TallyDeadLettersGrowing"}"#).count, 1)
        aggregator.signal(SIGTERM)
        XCTAssertEqual(aggregator.wait(timeout: .seconds(30)), 0, aggregator.log)
    }

    /// A port nothing listens on now (the kernel's pick for port 0).
    static func freePort() throws -> Int {
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c",
            "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"])
        XCTAssertEqual(status, 0, output)
        return try XCTUnwrap(Int(output.trimmingCharacters(in: .whitespacesAndNewlines)), output)
    }
}
