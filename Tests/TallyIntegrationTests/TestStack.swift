import Foundation
import Logging
import TallyCore
import TallyKafka
import XCTest

/// The local stack the integration tests run against (started by `scripts/stack up`).
enum TestStack {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static var databaseURL: String {
        get throws { try XCTUnwrap(ProcessInfo.processInfo.environment["TALLY_DATABASE_URL"], "run the tests through scripts/test (TALLY_DATABASE_URL is unset)") }
    }

    static var brokers: String {
        get throws { try XCTUnwrap(ProcessInfo.processInfo.environment["TALLY_KAFKA_BROKERS"], "run the tests through scripts/test (TALLY_KAFKA_BROKERS is unset)") }
    }

    /// The stack's credit keyring (`TALLY_CREDIT_KEYS_FILE`): the rater applies only credit signed with it.
    static let creditKeyring: CreditKeyring = {
        guard let path = ProcessInfo.processInfo.environment["TALLY_CREDIT_KEYS_FILE"],
              let text = try? String(contentsOfFile: path, encoding: .utf8), case .success(let keyring) = CreditKeyring.parse(text) else {
            fatalError("run the tests through scripts/test (TALLY_CREDIT_KEYS_FILE is unset or unreadable)")
        }
        return keyring
    }()

    /// A record keyed by `key`; grants, voids and budgets are signed as tally-ingest signs them.
    static func record(topic: String, key: String, value: [UInt8], partition: Int32? = nil) -> ProducerRecord {
        let keyBytes = Array(key.utf8)
        var headers: [KafkaHeader] = []
        switch EventDecoder.decode(value) {
        case .success(.grant), .success(.grantVoid), .success(.budget):
            headers = [KafkaHeader(CreditKeyring.headerName, creditKeyring.signature(topic: topic, key: keyBytes, value: value))]
        default: break
        }
        return ProducerRecord(topic: topic, key: keyBytes, value: value, headers: headers, partition: partition)
    }

    static let logger: Logger = {
        var logger = Logger(label: "tally.tests")
        logger.logLevel = .warning
        return logger
    }()

    /// A name no other test uses, for topics, groups and schemas.
    static func unique(_ prefix: String) -> String {
        "\(prefix)_\(UInt32.random(in: 0...UInt32.max))"
    }

    /// Runs `scripts/stack ARGUMENT` (faults such as `pg-restart`) and fails the test if it fails.
    static func stack(_ argument: String) throws {
        let (status, output) = try ChildProcess.run("/bin/bash", [root.appendingPathComponent("scripts/stack").path, argument])
        XCTAssertEqual(status, 0, "scripts/stack \(argument) failed: \(output)")
    }

    /// Polls `condition` until it holds or `timeout` passes.
    static func eventually(timeout: Duration = .seconds(60), _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try condition() { return true }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return try condition()
    }
}
