import Foundation
import XCTest

/// docker-compose.yml, the Dockerfile and Grafana's files, checked statically (no Docker engine
/// here) by scripts/check-deploy: services, images, referenced files, settings the executables
/// read, a scalable aggregator, the read-only Grafana role, dashboards that read only the views.
final class DeployFilesTests: XCTestCase {
    func testDeployFilesAreConsistent() throws {
        let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", TestStack.root.appendingPathComponent("scripts/check-deploy").path])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("deploy files ok: 8 services"), output)
    }
}
