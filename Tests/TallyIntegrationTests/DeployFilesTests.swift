import Foundation
import XCTest

/// The production files (docker-compose.yml, the Dockerfile, Grafana's and Prometheus's) checked
/// statically (no Docker engine here) by scripts/check-deploy: services, images, referenced files,
/// settings the executables read, a scalable aggregator, the read-only Grafana role, dashboards
/// that read only the views, metrics the rules and panels name that the services export.
final class DeployFilesTests: XCTestCase {
    func testDeployFilesAreConsistent() throws {
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", TestStack.root.appendingPathComponent("scripts/check-deploy").path])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("deploy files ok: 9 services"), output)
    }

    /// Every SQL query of the Grafana dashboards runs on a migrated database, with Grafana's
    /// macros and the customer filter filled in as Grafana fills them (one customer, and All).
    func testDashboardQueriesRunOnTheSchema() throws {
        let harness = try AggregatorHarness()
        let folder = TestStack.root.appendingPathComponent("deploy/grafana/dashboards")
        var queries = 0
        for file in try FileManager.default.contentsOfDirectory(atPath: folder.path) where file.hasSuffix(".json") {
            let dashboard = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: folder.appendingPathComponent(file))) as? [String: Any])
            var sources = (dashboard["panels"] as? [[String: Any]] ?? []).flatMap { $0["targets"] as? [[String: Any]] ?? [] }.compactMap { $0["rawSql"] as? String }
            let variables = (dashboard["templating"] as? [String: Any])?["list"] as? [[String: Any]] ?? []
            sources += variables.compactMap { $0["query"] as? String }
            for sql in sources {
                for customer in ["'__all'", "'cust-1'"] {
                    var filled = sql
                    for (macro, value) in [("$__timeFrom()", "'2026-11-01T00:00:00Z'::timestamptz"), ("$__timeTo()", "'2026-12-01T00:00:00Z'::timestamptz"),
                                           ("$customer", customer)] {
                        filled = filled.replacingOccurrences(of: macro, with: value)
                    }
                    filled = filled.replacingOccurrences(of: #"\$__timeFilter\(([^()]*(\([^()]*\))?[^()]*)\)"#, with: "$1 BETWEEN '2026-11-01T00:00:00Z' AND '2026-12-01T00:00:00Z'",
                                                         options: .regularExpression)
                    XCTAssertFalse(filled.contains("$"), "a macro left unfilled: \(filled)")
                    XCTAssertNoThrow(try harness.connection.query(filled), "\(file): \(filled)")
                    queries += 1
                }
            }
        }
        XCTAssertGreaterThan(queries, 20)
    }
}
