import Foundation
import TallyCore
import Yams

/// The OpenAPI 3.1 document of every tally-ingest route (`openapi.yaml`, kept beside the code and
/// checked against the running server by schemathesis in the tests), served as JSON at `/openapi.json`.
enum OpenAPIDocument {
    /// The document as JSON, converted once; members keep the YAML's order.
    static let json: [UInt8] = {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "yaml"),
              let text = try? String(contentsOf: url, encoding: .utf8), let root = try? Yams.compose(yaml: text) else {
            // The build copies the file; a missing one is a broken installation, said in the answer.
            return Array(#"{"openapi":"3.1.0","info":{"title":"Tally (openapi.yaml missing from this installation)","version":"0"},"paths":{}}"#.utf8)
        }
        var writer = JSONWriter()
        write(root, to: &writer)
        return writer.bytes
    }()

    /// YAML to JSON with the YAML 1.2 JSON schema's typing: plain `1`, `1.5`, `true`, `null` are
    /// numbers, a boolean and null; quoted and other scalars are strings.
    private static func write(_ node: Node, to writer: inout JSONWriter) {
        switch node {
        case .mapping(let mapping):
            writer.raw("{")
            for (index, pair) in mapping.enumerated() {
                writer.key(pair.key.string ?? "", first: index == 0)
                write(pair.value, to: &writer)
            }
            writer.raw("}")
        case .sequence(let sequence):
            writer.raw("[")
            for (index, element) in sequence.enumerated() {
                if index > 0 { writer.raw(",") }
                write(element, to: &writer)
            }
            writer.raw("]")
        case .scalar(let scalar):
            let text = scalar.string
            guard scalar.style == .plain else { return writer.string(text) }
            if text == "true" || text == "false" || text == "null" {
                writer.raw(text)
            } else if text.range(of: #"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$"#, options: .regularExpression) != nil {
                // Only what JSON's own number grammar allows goes out bare.
                writer.raw(text)
            } else {
                writer.string(text)
            }
        case .alias:
            writer.raw("null")
        }
    }
}
