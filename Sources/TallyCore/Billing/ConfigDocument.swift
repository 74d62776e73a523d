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

    /// Parses JSON when the text starts with `{` or `[`, YAML (the block subset price books need) otherwise.
    public static func parse(_ text: String) throws(ConfigError) -> ConfigNode {
        let trimmed = text.drop { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" || $0 == "\u{FEFF}" }
        if trimmed.first == "{" || trimmed.first == "[" { return try parseJSON(text) }
        var parser = YAMLSubsetParser(text)
        return try parser.parseDocument()
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

/// The part of YAML that configuration files use: block maps and lists by indentation,
/// `- key: value` items, flow lists/maps (`[a, b]`, `{k: v}`), quoted and plain scalars, comments.
/// Anchors, tags, multi-documents and block scalars are refused with a clear error.
struct YAMLSubsetParser {
    private struct Line {
        let number: Int
        let indent: Int
        let text: Substring
    }

    private var lines: [Line] = []
    private var index = 0

    init(_ text: String) {
        var number = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            number += 1
            let line = raw.last == "\r" ? raw.dropLast() : raw
            let content = Self.stripComment(line)
            let indent = content.prefix { $0 == " " }.count
            let body = content.dropFirst(indent)
            if body.allSatisfy({ $0 == " " || $0 == "\t" }) { continue }
            lines.append(Line(number: number, indent: indent, text: Self.trimTrailing(body)))
        }
    }

    mutating func parseDocument() throws(ConfigError) -> ConfigNode {
        if let first = lines.first, first.text == "---" { index += 1 }
        guard index < lines.count else { return ConfigNode(.null, line: 1) }
        let node = try parseBlock(indent: lines[index].indent)
        if index < lines.count {
            let line = lines[index]
            throw ConfigError(line: line.number, path: "", message: line.text == "---" ? "only one YAML document is supported" : "unexpected indentation")
        }
        return node
    }

    private mutating func parseBlock(indent: Int) throws(ConfigError) -> ConfigNode {
        let first = lines[index]
        if first.text == "-" || first.text.hasPrefix("- ") { return try parseList(indent: indent) }
        return try parseMap(indent: indent)
    }

    private mutating func parseList(indent: Int) throws(ConfigError) -> ConfigNode {
        let startLine = lines[index].number
        var items: [ConfigNode] = []
        while index < lines.count, lines[index].indent == indent, lines[index].text == "-" || lines[index].text.hasPrefix("- ") {
            let line = lines[index]
            let rest = line.text.dropFirst(1).drop { $0 == " " }
            if rest.isEmpty {
                index += 1
                items.append(try nestedBlock(after: line, parentIndent: indent))
            } else if Self.splitKey(rest) != nil {
                // "- key: value": a map whose keys sit at the column after "- ".
                let column = indent + (line.text.count - rest.count)
                lines[index] = Line(number: line.number, indent: column, text: rest)
                items.append(try parseMap(indent: column))
            } else {
                index += 1
                items.append(try Self.parseInline(rest, line: line.number))
            }
        }
        return ConfigNode(.list(items), line: startLine)
    }

    private mutating func parseMap(indent: Int) throws(ConfigError) -> ConfigNode {
        let startLine = lines[index].number
        var members: [(key: String, node: ConfigNode)] = []
        while index < lines.count, lines[index].indent == indent {
            let line = lines[index]
            if line.text == "-" || line.text.hasPrefix("- ") { break }
            guard let (key, rest) = Self.splitKey(line.text) else {
                throw ConfigError(line: line.number, path: "", message: "expected \"key: value\"")
            }
            guard !members.contains(where: { $0.key == key }) else {
                throw ConfigError(line: line.number, path: key, message: "duplicate key")
            }
            index += 1
            if rest.isEmpty {
                members.append((key, try nestedBlock(after: line, parentIndent: indent)))
            } else {
                members.append((key, try Self.parseInline(rest, line: line.number)))
            }
        }
        if index < lines.count, lines[index].indent > indent {
            throw ConfigError(line: lines[index].number, path: "", message: "unexpected indentation")
        }
        return ConfigNode(.map(members), line: startLine)
    }

    /// The block under a `key:` or `-` with nothing after it; null when nothing is indented under it.
    private mutating func nestedBlock(after line: Line, parentIndent: Int) throws(ConfigError) -> ConfigNode {
        guard index < lines.count else { return ConfigNode(.null, line: line.number) }
        let next = lines[index]
        // A list may sit at the same indentation as its parent key ("key:\n- a").
        let isSameIndentList = next.indent == parentIndent && (next.text == "-" || next.text.hasPrefix("- ")) && !line.text.hasPrefix("-")
        guard next.indent > parentIndent || isSameIndentList else { return ConfigNode(.null, line: line.number) }
        return try parseBlock(indent: next.indent)
    }

    /// `key: rest` with the key unquoted if quoted; nil when the text is not a mapping entry.
    private static func splitKey(_ text: Substring) -> (String, Substring)? {
        var keyEnd: Substring.Index
        var key: String
        if let quote = text.first, quote == "\"" || quote == "'" {
            guard let close = text.dropFirst().firstIndex(of: quote) else { return nil }
            key = String(text[text.index(after: text.startIndex)..<close])
            keyEnd = text.index(after: close)
            guard keyEnd < text.endIndex, text[keyEnd] == ":" else { return nil }
        } else {
            guard let colon = text.indices.first(where: { i in
                text[i] == ":" && (text.index(after: i) == text.endIndex || text[text.index(after: i)] == " ")
            }) else { return nil }
            if text.first == "[" || text.first == "{" { return nil }
            key = String(text[..<colon]).trimmingTrailingSpaces
            keyEnd = colon
        }
        let rest = text[text.index(after: keyEnd)...].drop { $0 == " " }
        return (key, rest)
    }

    /// A value written on one line: flow collection, quoted or plain scalar.
    private static func parseInline(_ text: Substring, line: Int) throws(ConfigError) -> ConfigNode {
        var flow = FlowReader(text: Array(text), line: line)
        let node = try flow.readValue()
        flow.skipSpaces()
        guard flow.atEnd else { throw ConfigError(line: line, path: "", message: "unexpected text after the value: \(String(flow.rest))") }
        return node
    }

    private static func stripComment(_ line: Substring) -> Substring {
        var quote: Character?
        var previous: Character = " "
        for i in line.indices {
            let c = line[i]
            if let open = quote {
                if c == open { quote = nil }
            } else if c == "\"" || c == "'" {
                quote = c
            } else if c == "#" && (previous == " " || previous == "\t") {
                return line[..<i]
            }
            previous = c
        }
        return line
    }

    private static func trimTrailing(_ text: Substring) -> Substring {
        var text = text
        while text.last == " " || text.last == "\t" { text = text.dropLast() }
        return text
    }
}

/// Reads flow-style YAML values on one line.
private struct FlowReader {
    let text: [Character]
    let line: Int
    var position = 0

    var atEnd: Bool { position >= text.count }
    var rest: ArraySlice<Character> { text[position...] }

    mutating func skipSpaces() { while position < text.count && text[position] == " " { position += 1 } }

    mutating func readValue(inFlow: Bool = false) throws(ConfigError) -> ConfigNode {
        skipSpaces()
        guard position < text.count else { return ConfigNode(.null, line: line) }
        switch text[position] {
        case "[":
            position += 1
            var items: [ConfigNode] = []
            skipSpaces()
            if position < text.count && text[position] == "]" { position += 1; return ConfigNode(.list(items), line: line) }
            while true {
                items.append(try readValue(inFlow: true))
                skipSpaces()
                guard position < text.count else { throw error("unclosed [") }
                if text[position] == "," { position += 1; continue }
                if text[position] == "]" { position += 1; return ConfigNode(.list(items), line: line) }
                throw error("expected , or ]")
            }
        case "{":
            position += 1
            var members: [(key: String, node: ConfigNode)] = []
            skipSpaces()
            if position < text.count && text[position] == "}" { position += 1; return ConfigNode(.map(members), line: line) }
            while true {
                skipSpaces()
                guard case .scalar(let key) = try readScalar(inFlow: true, stopAtColon: true).value else { throw error("expected a key") }
                skipSpaces()
                guard position < text.count, text[position] == ":" else { throw error("expected : after \(key)") }
                position += 1
                if members.contains(where: { $0.key == key }) { throw ConfigError(line: line, path: key, message: "duplicate key") }
                members.append((key, try readValue(inFlow: true)))
                skipSpaces()
                guard position < text.count else { throw error("unclosed {") }
                if text[position] == "," { position += 1; continue }
                if text[position] == "}" { position += 1; return ConfigNode(.map(members), line: line) }
                throw error("expected , or }")
            }
        case "&", "*", "!", "|", ">":
            throw error("anchors, tags and block scalars are not supported; write the value out")
        default:
            return try readScalar(inFlow: inFlow, stopAtColon: false)
        }
    }

    private mutating func readScalar(inFlow: Bool, stopAtColon: Bool) throws(ConfigError) -> ConfigNode {
        skipSpaces()
        guard position < text.count else { throw error("value expected") }
        let quote = text[position]
        if quote == "\"" || quote == "'" {
            position += 1
            var value = ""
            while true {
                guard position < text.count else { throw error("unclosed quote") }
                let c = text[position]
                position += 1
                if c == quote {
                    // '' is an escaped single quote inside single quotes.
                    if quote == "'" && position < text.count && text[position] == "'" { value.append("'"); position += 1; continue }
                    return ConfigNode(.scalar(value), line: line)
                }
                if c == "\\" && quote == "\"" {
                    guard position < text.count else { throw error("unclosed quote") }
                    let escaped = text[position]
                    position += 1
                    switch escaped {
                    case "n": value.append("\n")
                    case "t": value.append("\t")
                    case "\\", "\"", "/": value.append(escaped)
                    default: throw error("unsupported escape \\\(escaped)")
                    }
                    continue
                }
                value.append(c)
            }
        }
        let start = position
        while position < text.count {
            let c = text[position]
            if inFlow && (c == "," || c == "]" || c == "}") { break }
            if stopAtColon && c == ":" { break }
            position += 1
        }
        var plain = String(text[start..<position])
        while plain.last == " " { plain.removeLast() }
        if plain == "null" || plain == "~" { return ConfigNode(.null, line: line) }
        return ConfigNode(.scalar(plain), line: line)
    }

    private func error(_ message: String) -> ConfigError { ConfigError(line: line, path: "", message: message) }
}

extension String {
    var trimmingTrailingSpaces: String {
        var text = self
        while text.last == " " { text.removeLast() }
        return text
    }
}
