import TallyCore
import XCTest

/// Configuration documents (price books) read through Yams: scalars stay text, null is told apart,
/// and every error names its line.
final class ConfigDocumentTests: XCTestCase {
    func testScalarsStayTextAndOnlyNullIsResolved() throws {
        let node = try ConfigNode.parse("a: 2.50\nb: yes\nc: ~\nd:\ne: null\nf: \"null\"\ng: 0x10\nh: 2026-01-01T00:00:00Z\n")
        XCTAssertEqual(node["a"]?.value, .scalar("2.50"), "a price keeps its digits")
        XCTAssertEqual(node["b"]?.value, .scalar("yes"))
        XCTAssertEqual(node["c"]?.value, .null)
        XCTAssertEqual(node["d"]?.value, .null)
        XCTAssertEqual(node["e"]?.value, .null)
        XCTAssertEqual(node["f"]?.value, .scalar("null"), "a quoted null is text")
        XCTAssertEqual(node["g"]?.value, .scalar("0x10"))
        XCTAssertEqual(node["h"]?.value, .scalar("2026-01-01T00:00:00Z"))
        XCTAssertEqual(node["g"]?.line, 7)
        XCTAssertEqual(node.keys, ["a", "b", "c", "d", "e", "f", "g", "h"], "keys keep their order")
    }

    func testFlowAndBlockCollectionsKeepTheirLines() throws {
        let node = try ConfigNode.parse("models:\n  - { model: m, input: \"1\" }\n  - model: n\n    input: \"2\"\n")
        guard case .list(let models) = node["models"]?.value else { return XCTFail("models is a list") }
        XCTAssertEqual(models.map(\.line), [2, 3])
        XCTAssertEqual(models[1]["input"]?.value, .scalar("2"))
        XCTAssertEqual(models[1]["input"]?.line, 4)
    }

    func testErrorsNameTheLine() {
        func error(_ text: String) -> ConfigError? {
            do { _ = try ConfigNode.parse(text); return nil } catch { return error }
        }
        XCTAssertEqual(error("a: 1\nb: 2\na: 3")?.message, "duplicate key")
        XCTAssertEqual(error("a: 1\nb: 2\na: 3")?.path, "a")
        XCTAssertEqual(error("1: x\n\"1\": y")?.line, 2, "keys compare as text")
        XCTAssertEqual(error("a: [1, 2\nb: 3")?.line, 2)
        XCTAssertNotNil(error("a: 1\n---\nb: 2"), "one document only")
        XCTAssertEqual(error("a:\n\t- 1")?.line, 2, "a tab is not indentation")
    }
}
