import Yams

/// A configuration document (price books) read from JSON or YAML, with the line each value sits on,
/// so validation errors can say where. Scalars stay text: numbers are parsed exactly by their users.
public struct ConfigNode: Sendable, Equatable {
    public indirect enum Value: Sendable, Equatable {
        case map([(key: String, node: ConfigNode)])
        case list([ConfigNode])
        case scalar(String)
        case null

        public static func == (a: Value, b: Value) -> Bool {
            switch (a, b) {
            case (.map(let x), .map(let y)): x.count == y.count && zip(x, y).allSatisfy { $0.key == $1.key && $0.node == $1.node }
            case (.list(let x), .list(let y)): x == y
            case (.scalar(let x), .scalar(let y)): x == y
            case (.null, .null): true
            default: false
            }
        }
    }

    public let value: Value
    /// 1-based line in the source text.
    public let line: Int

    public init(_ value: Value, line: Int) {
        self.value = value
        self.line = line
    }

    public subscript(key: String) -> ConfigNode? {
        if case .map(let members) = value { return members.first { $0.key == key }?.node }
        return nil
    }

    public var keys: [String] {
        if case .map(let members) = value { return members.map(\.key) }
        return []
    }

    /// Parses JSON when the text starts with `{` or `[`, YAML otherwise.
    public static func parse(_ text: String) throws(ConfigError) -> ConfigNode {
        let trimmed = text.drop { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" || $0 == "\u{FEFF}" }
        if trimmed.first == "{" || trimmed.first == "[" { return try parseJSON(text) }
        return try YAMLDocument.parse(text)
    }

    public static func parseJSON(_ text: String) throws(ConfigError) -> ConfigNode {
        let bytes = Array(text.utf8)
        // Where each line starts, found once: a value's line is a binary search, so parsing stays
        // linear (counting from the start for every value took minutes on LiteLLM's 3.4 MB file).
        var lineStarts = [0]
        for (offset, byte) in bytes.enumerated() where byte == 0x0a { lineStarts.append(offset + 1) }
        func line(at offset: Int) -> Int {
            var low = 0, high = lineStarts.count
            while low < high {
                let middle = (low + high) / 2
                if lineStarts[middle] <= offset { low = middle + 1 } else { high = middle }
            }
            return max(low, 1)
        }
        do throws(JSONSyntaxError) {
            return try bytes.withUnsafeBufferPointer { (buffer) throws(JSONSyntaxError) -> ConfigNode in
                var reader = JSONReader(buffer)
                let node = try readJSON(&reader, depth: 0, line: line)
                try reader.finish()
                return node
            }
        } catch {
            throw ConfigError(line: line(at: error.offset), path: "", message: error.reason)
        }
    }

    private static func readJSON(_ reader: inout JSONReader, depth: Int, line: (Int) -> Int) throws(JSONSyntaxError) -> ConfigNode {
        guard depth < JSONReader.maxDepth else { throw reader.error("nesting deeper than \(JSONReader.maxDepth)") }
        reader.skipWhitespace()
        let here = line(reader.index)
        switch try reader.peekKind() {
        case .object:
            var members: [(key: String, node: ConfigNode)] = []
            var seen = Set<String>()
            try reader.readObject { (reader: inout JSONReader, key: String) throws(JSONSyntaxError) in
                guard seen.insert(key).inserted else { throw reader.error("duplicate key \"\(key)\"") }
                members.append((key, try readJSON(&reader, depth: depth + 1, line: line)))
            }
            return ConfigNode(.map(members), line: here)
        case .array:
            var elements: [ConfigNode] = []
            try reader.consume(UInt8(ascii: "["))
            if !reader.consumeIf(UInt8(ascii: "]")) {
                repeat { elements.append(try readJSON(&reader, depth: depth + 1, line: line)) } while reader.consumeIf(UInt8(ascii: ","))
                try reader.consume(UInt8(ascii: "]"))
            }
            return ConfigNode(.list(elements), line: here)
        case .string:
            return ConfigNode(.scalar(try reader.readString()), line: here)
        case .number:
            // Keep the number's own digits: "3e-06" must stay exactly that.
            let range = try reader.skipValue()
            return ConfigNode(.scalar(String(decoding: UnsafeBufferPointer(rebasing: reader.bytes[range]), as: UTF8.self)), line: here)
        case .bool, .null:
            let literal = try reader.readLiteral()
            return ConfigNode(literal.map { .scalar($0 ? "true" : "false") } ?? .null, line: here)
        }
    }
}

/// A validation error in a configuration document: where and why.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public let line: Int
    /// Dotted path of the offending field (`models[2].input.tiers[0].up_to`); empty for syntax errors.
    public let path: String
    public let message: String

    public init(line: Int, path: String, message: String) {
        self.line = line
        self.path = path
        self.message = message
    }

    public var description: String { "line \(line)\(path.isEmpty ? "" : ", \(path)"): \(message)" }
}

/// YAML through Yams (libyaml): one document, turned into `ConfigNode`s with each node's line.
/// Scalars stay text whatever YAML would resolve them to (`2.50` stays "2.50", `yes` stays "yes"),
/// so prices are parsed exactly by their users; only null (`null`, `~`, nothing) is told apart.
enum YAMLDocument {
    static func parse(_ text: String) throws(ConfigError) -> ConfigNode {
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let error as YamlError {
            throw Self.configError(error)
        } catch {
            throw ConfigError(line: 1, path: "", message: "\(error)")
        }
        guard let root else { return ConfigNode(.null, line: 1) }
        return try node(root, depth: 0)
    }

    private static func node(_ node: Node, depth: Int) throws(ConfigError) -> ConfigNode {
        let line = node.mark?.line ?? 1
        guard depth < JSONReader.maxDepth else { throw ConfigError(line: line, path: "", message: "nesting deeper than \(JSONReader.maxDepth)") }
        switch node {
        case .scalar(let scalar):
            return ConfigNode(node.tag.rawValue == Tag.Name.null.rawValue ? .null : .scalar(scalar.string), line: line)
        case .mapping(let mapping):
            var members: [(key: String, node: ConfigNode)] = []
            for (key, value) in mapping {
                guard case .scalar(let name) = key else {
                    throw ConfigError(line: key.mark?.line ?? line, path: "", message: "a key must be a plain value")
                }
                // As text: `1:` and `"1":` are one key here, whatever YAML makes of them.
                guard !members.contains(where: { $0.key == name.string }) else {
                    throw ConfigError(line: key.mark?.line ?? line, path: name.string, message: "duplicate key")
                }
                members.append((name.string, try self.node(value, depth: depth + 1)))
            }
            return ConfigNode(.map(members), line: line)
        case .sequence(let sequence):
            var items: [ConfigNode] = []
            for item in sequence { items.append(try self.node(item, depth: depth + 1)) }
            return ConfigNode(.list(items), line: line)
        default:
            throw ConfigError(line: line, path: "", message: "unsupported YAML node; write the value out")
        }
    }

    private static func configError(_ error: YamlError) -> ConfigError {
        switch error {
        case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _), .composer(_, let problem, let mark, _):
            return ConfigError(line: mark.line, path: "", message: problem)
        case .duplicatedKeysInMapping(let duplicates, let context):
            return ConfigError(line: context.mark.line, path: duplicates.joined(separator: ","), message: "duplicate key")
        case .reader(let problem, _, _, _):
            return ConfigError(line: 1, path: "", message: problem)
        default:
            return ConfigError(line: 1, path: "", message: "\(error)")
        }
    }
}
