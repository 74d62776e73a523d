import Foundation
import TallyCore
import XCTest

/// The Swift validator and the JSON Schema must agree on every example of the corpus.
final class EventCorpusTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")
    /// Usage events (`Fixtures/events`, `schemas/usage-event.v1.json`), wallet grants (`Fixtures/grants`,
    /// `schemas/wallet-grant.v1.json`) or grant voids (`Fixtures/voids`, `schemas/wallet-grant-void.v1.json`).
    var corpus = fixtures.appendingPathComponent("events")
    var schema = "schemas/usage-event.v1.json"

    func useGrantCorpus() {
        corpus = Self.fixtures.appendingPathComponent("grants")
        schema = "schemas/wallet-grant.v1.json"
    }

    func files(_ folder: String) throws -> [URL] {
        try FileManager.default.contentsOfDirectory(at: corpus.appendingPathComponent(folder), includingPropertiesForKeys: nil)
            .filter { $0.pathExtension == "json" && $0.lastPathComponent != "expected.json" }
            .sorted { $0.path < $1.path }
    }

    func expectedPaths(_ folder: String) throws -> [String: String] {
        let data = try Data(contentsOf: corpus.appendingPathComponent(folder).appendingPathComponent("expected.json"))
        return try JSONDecoder().decode([String: String].self, from: data)
    }

    func swiftVerdict(_ url: URL) throws -> Result<TallyEvent, EventDecodingError> {
        EventDecoder.decode([UInt8](try Data(contentsOf: url)))
    }

    func testValidExamplesAreAccepted() throws {
        try checkValidExamplesAreAccepted(atLeast: 15)
    }

    func testInvalidExamplesAreRejectedAtTheExpectedPath() throws {
        try checkInvalidExamplesAreRejectedAtTheExpectedPath()
    }

    func testJSONSchemaAgreesWithSwiftValidator() throws {
        try checkJSONSchemaAgreesWithSwiftValidator()
    }

    func testGrantVoidCorpus() throws {
        corpus = Self.fixtures.appendingPathComponent("voids")
        schema = "schemas/wallet-grant-void.v1.json"
        try checkValidExamplesAreAccepted(atLeast: 3)
        try checkInvalidExamplesAreRejectedAtTheExpectedPath()
        try checkJSONSchemaAgreesWithSwiftValidator()
    }

    func testBudgetCorpus() throws {
        corpus = Self.fixtures.appendingPathComponent("budgets")
        schema = "schemas/budget.v1.json"
        try checkValidExamplesAreAccepted(atLeast: 6)
        try checkInvalidExamplesAreRejectedAtTheExpectedPath()
        try checkJSONSchemaAgreesWithSwiftValidator()
    }

    func testGrantCorpus() throws {
        useGrantCorpus()
        try checkValidExamplesAreAccepted(atLeast: 5)
        try checkInvalidExamplesAreRejectedAtTheExpectedPath()
        try checkJSONSchemaAgreesWithSwiftValidator()
    }

    func checkValidExamplesAreAccepted(atLeast minimum: Int) throws {
        let valid = try files("valid")
        XCTAssertGreaterThanOrEqual(valid.count, minimum)
        for url in valid {
            if case .failure(let error) = try swiftVerdict(url) {
                XCTFail("\(url.lastPathComponent) rejected: \(error)")
            }
        }
    }

    func checkInvalidExamplesAreRejectedAtTheExpectedPath() throws {
        for folder in ["invalid", "beyond-schema"] {
            let expected = try expectedPaths(folder)
            let urls = try files(folder)
            XCTAssertEqual(Set(urls.map(\.lastPathComponent)), Set(expected.keys), "expected.json lists every \(folder) file")
            for url in urls {
                switch try swiftVerdict(url) {
                case .success:
                    XCTFail("\(url.lastPathComponent) accepted")
                case .failure(let error):
                    let path = expected[url.lastPathComponent]!
                    if path.isEmpty {
                        // Malformed JSON or not an object: the error is about the document.
                        XCTAssertTrue(error.violations.contains { $0.path == "" }, "\(url.lastPathComponent): \(error)")
                    } else {
                        XCTAssertTrue(error.violations.contains { $0.path == path },
                                      "\(url.lastPathComponent): expected a violation at \(path), got \(error)")
                    }
                }
            }
        }
    }

    /// Runs the JSON Schema through Python's `jsonschema` over the same files and compares verdicts.
    func checkJSONSchemaAgreesWithSwiftValidator() throws {
        let all = try files("valid") + files("invalid") + files("beyond-schema")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", Self.root.appendingPathComponent("scripts/schema-check").path,
                             Self.root.appendingPathComponent(schema).path] + all.map(\.path)
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        let errorText = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0, "schema-check failed (is jsonschema installed? scripts/stack up installs it): \(errorText)")
        struct Verdict: Decodable { let valid: Bool; let errors: [String] }
        let verdicts = try JSONDecoder().decode([String: Verdict].self, from: data)
        XCTAssertEqual(verdicts.count, all.count)
        for url in all {
            guard let schemaVerdict = verdicts[url.path] else { XCTFail("no verdict for \(url.path)"); continue }
            let swiftValid = (try? swiftVerdict(url).get()) != nil
            let folder = url.deletingLastPathComponent().lastPathComponent
            if folder == "beyond-schema" {
                // Rules JSON Schema cannot express: the schema accepts, Tally rejects.
                XCTAssertTrue(schemaVerdict.valid, "\(url.lastPathComponent): \(schemaVerdict.errors)")
                XCTAssertFalse(swiftValid, url.lastPathComponent)
            } else {
                XCTAssertEqual(schemaVerdict.valid, swiftValid,
                               "\(folder)/\(url.lastPathComponent): schema says \(schemaVerdict.valid) \(schemaVerdict.errors), Swift says \(swiftValid)")
                XCTAssertEqual(schemaVerdict.valid, folder == "valid", "\(folder)/\(url.lastPathComponent): \(schemaVerdict.errors)")
            }
        }
    }
}
