/// A parsed JSON document, for the small, irregular payloads (provider usage objects)
/// where a tree is simpler than pulling fields; numbers stay exact.
public indirect enum JSONValue: Equatable, Sendable {
    case object([String: JSONValue])
    case array([JSONValue])
    case string(String)
    case integer(JSONInteger)
    case bool(Bool)
    case null

    public static func parse(_ bytes: [UInt8]) -> Result<JSONValue, JSONSyntaxError> {
        bytes.withUnsafeBufferPointer { buffer in
            var reader = JSONReader(buffer)
            do throws(JSONSyntaxError) {
                let value = try read(&reader, depth: 0)
                try reader.finish()
                return .success(value)
            } catch {
                return .failure(error)
            }
        }
    }

    static func read(_ reader: inout JSONReader, depth: Int) throws(JSONSyntaxError) -> JSONValue {
        guard depth < JSONReader.maxDepth else { throw reader.error("nesting deeper than \(JSONReader.maxDepth)") }
        switch try reader.peekKind() {
        case .object:
            var members: [String: JSONValue] = [:]
            try reader.readObject { (reader: inout JSONReader, key: String) throws(JSONSyntaxError) in
                guard members[key] == nil else { throw reader.error("duplicate key \"\(key)\"") }
                members[key] = try read(&reader, depth: depth + 1)
            }
            return .object(members)
        case .array:
            var elements: [JSONValue] = []
            try reader.consume(UInt8(ascii: "["))
            if !reader.consumeIf(UInt8(ascii: "]")) {
                repeat { elements.append(try read(&reader, depth: depth + 1)) } while reader.consumeIf(UInt8(ascii: ","))
                try reader.consume(UInt8(ascii: "]"))
            }
            return .array(elements)
        case .string: return .string(try reader.readString())
        case .number: return .integer(try reader.readInteger())
        case .bool, .null: return try reader.readLiteral().map(JSONValue.bool) ?? .null
        }
    }

    public subscript(key: String) -> JSONValue? {
        if case .object(let members) = self { return members[key] }
        return nil
    }

    public var string: String? {
        if case .string(let text) = self { return text }
        return nil
    }
}
