/// A JSON syntax error with the byte offset where reading stopped.
public struct JSONSyntaxError: Error, Hashable, Sendable, CustomStringConvertible {
    public let offset: Int
    public let reason: String
    public var description: String { "malformed JSON at byte \(offset): \(reason)" }
}

/// The kind of the next JSON value, for "must be a string"-style messages.
enum JSONKind: Equatable {
    case object, array, string, number, bool, null

    var name: String {
        switch self {
        case .object: "an object"
        case .array: "an array"
        case .string: "a string"
        case .number: "a number"
        case .bool: "a boolean"
        case .null: "null"
        }
    }
}

/// A JSON number read exactly, with no floating point: either a whole number that
/// fits the range Tally accepts, or the reason it is not one.
public enum JSONInteger: Equatable, Sendable {
    case value(Int64)
    /// Has a non-zero fractional part.
    case fractional
    /// Whole, but above `JSONReader.maxInteger` (or below its negation).
    case outOfRange(negative: Bool)
}

/// An object member's name: its bytes in the input when it is plain ASCII with no escapes (the
/// usual case, read without allocating), else its decoded text.
struct JSONKey {
    private let plain: UnsafeBufferPointer<UInt8>?
    private let decoded: String?

    init(plain: UnsafeBufferPointer<UInt8>) {
        self.plain = plain
        decoded = nil
    }

    init(decoded: String) {
        plain = nil
        self.decoded = decoded
    }

    var string: String { decoded ?? String(decoding: plain!, as: UTF8.self) }

    /// Calls `body` with the name's UTF-8 bytes.
    func withUTF8<Result>(_ body: (UnsafeBufferPointer<UInt8>) -> Result) -> Result {
        if let plain { return body(plain) }
        var text = decoded!
        return text.withUTF8(body)
    }
}

/// A forward-only reader over UTF-8 JSON bytes (RFC 8259), strict like Python's `json`.
///
/// It never builds a tree: the event decoder pulls exactly the values it needs,
/// which is what makes decoding several times faster than `JSONDecoder`.
struct JSONReader: ~Copyable {
    /// 2^53 - 1: the largest integer every JSON implementation reads exactly.
    static let maxInteger: Int64 = 9_007_199_254_740_991
    static let maxDepth = 64

    let bytes: UnsafeBufferPointer<UInt8>
    var index = 0
    /// Whether the last string `readString` returned holds a control character (U+0000–U+001F,
    /// which JSON allows only escaped, or U+007F): found while scanning, not in a second pass.
    private(set) var lastStringHasControl = false

    init(_ bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
    }

    func error(_ reason: String) -> JSONSyntaxError {
        JSONSyntaxError(offset: index, reason: reason)
    }

    mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x09, 0x0a, 0x0d: index += 1
            default: return
            }
        }
    }

    var atEnd: Bool { index >= bytes.count }

    mutating func peekKind() throws(JSONSyntaxError) -> JSONKind {
        skipWhitespace()
        guard index < bytes.count else { throw error("unexpected end of input") }
        switch bytes[index] {
        case UInt8(ascii: "{"): return .object
        case UInt8(ascii: "["): return .array
        case UInt8(ascii: "\""): return .string
        case UInt8(ascii: "t"), UInt8(ascii: "f"): return .bool
        case UInt8(ascii: "n"): return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number
        default: throw error("unexpected character '\(Self.printable(bytes[index]))'")
        }
    }

    mutating func consume(_ byte: UInt8) throws(JSONSyntaxError) {
        skipWhitespace()
        guard index < bytes.count else { throw error("unexpected end of input, expected '\(Self.printable(byte))'") }
        guard bytes[index] == byte else {
            throw error("expected '\(Self.printable(byte))', found '\(Self.printable(bytes[index]))'")
        }
        index += 1
    }

    /// Consumes `byte` if it is next (after whitespace).
    mutating func consumeIf(_ byte: UInt8) -> Bool {
        skipWhitespace()
        if index < bytes.count && bytes[index] == byte { index += 1; return true }
        return false
    }

    /// Iterates an object's members: `body` gets each key and must consume the value.
    mutating func readObject(_ body: (inout JSONReader, String) throws(JSONSyntaxError) -> Void) throws(JSONSyntaxError) {
        try readMembers { (reader: inout JSONReader, key: JSONKey) throws(JSONSyntaxError) in try body(&reader, key.string) }
    }

    /// Iterates an object's members as `readObject` does, giving each key without making a
    /// `String` of it: most keys are only compared with the names a decoder knows.
    mutating func readMembers(_ body: (inout JSONReader, JSONKey) throws(JSONSyntaxError) -> Void) throws(JSONSyntaxError) {
        try consume(UInt8(ascii: "{"))
        if consumeIf(UInt8(ascii: "}")) { return }
        while true {
            skipWhitespace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") else {
                throw error(index < bytes.count ? "expected a string key" : "unexpected end of input")
            }
            let key = try readKey()
            try consume(UInt8(ascii: ":"))
            try body(&self, key)
            if consumeIf(UInt8(ascii: ",")) { continue }
            try consume(UInt8(ascii: "}"))
            return
        }
    }

    /// Reads a member name at the opening quote: in place when it is plain ASCII, else decoded.
    private mutating func readKey() throws(JSONSyntaxError) -> JSONKey {
        let quote = index
        var end = quote + 1
        while end < bytes.count {
            let byte = bytes[end]
            if byte == UInt8(ascii: "\"") {
                index = end + 1
                return JSONKey(plain: UnsafeBufferPointer(rebasing: bytes[(quote + 1)..<end]))
            }
            // Escapes, control characters and non-ASCII take the general path, which checks them.
            if byte == UInt8(ascii: "\\") || byte < 0x20 || byte >= 0x80 { break }
            end += 1
        }
        return JSONKey(decoded: try readString())
    }

    /// Reads a string value, decoding escapes; rejects raw control characters and invalid UTF-8.
    mutating func readString() throws(JSONSyntaxError) -> String {
        try consume(UInt8(ascii: "\""))
        let start = index
        var ascii = true
        lastStringHasControl = false
        // Fast path: no escapes.
        while index < bytes.count {
            let byte = bytes[index]
            if byte == UInt8(ascii: "\"") {
                let slice = UnsafeBufferPointer(rebasing: bytes[start..<index])
                index += 1
                // ASCII needs no UTF-8 validation.
                if ascii { return String(decoding: slice, as: UTF8.self) }
                if let text = String(validating: slice, as: UTF8.self) { return text }
                index = start
                throw error("invalid UTF-8 in string")
            }
            if byte == UInt8(ascii: "\\") { break }
            if byte < 0x20 { throw error("control character in string") }
            if byte >= 0x7f {
                if byte == 0x7f { lastStringHasControl = true } else { ascii = false }
            }
            index += 1
        }
        var scratch = Array(UnsafeBufferPointer(rebasing: bytes[start..<index]))
        while index < bytes.count {
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "\""):
                index += 1
                lastStringHasControl = scratch.contains { $0 < 0x20 || $0 == 0x7f }
                if let text = String(validating: scratch, as: UTF8.self) { return text }
                throw error("invalid UTF-8 in string")
            case UInt8(ascii: "\\"):
                index += 1
                guard index < bytes.count else { throw error("unexpected end of input in string") }
                let escape = bytes[index]
                index += 1
                switch escape {
                case UInt8(ascii: "\""): scratch.append(0x22)
                case UInt8(ascii: "\\"): scratch.append(0x5c)
                case UInt8(ascii: "/"): scratch.append(0x2f)
                case UInt8(ascii: "b"): scratch.append(0x08)
                case UInt8(ascii: "f"): scratch.append(0x0c)
                case UInt8(ascii: "n"): scratch.append(0x0a)
                case UInt8(ascii: "r"): scratch.append(0x0d)
                case UInt8(ascii: "t"): scratch.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try readHex4()
                    if (0xD800...0xDBFF).contains(scalar) {
                        guard index + 1 < bytes.count, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") else {
                            throw error("unpaired surrogate in \\u escape")
                        }
                        index += 2
                        let low = try readHex4()
                        guard (0xDC00...0xDFFF).contains(low) else { throw error("unpaired surrogate in \\u escape") }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(scalar) {
                        throw error("unpaired surrogate in \\u escape")
                    }
                    scratch.append(contentsOf: String(Unicode.Scalar(scalar)!).utf8)
                default:
                    index -= 1
                    throw error("invalid escape '\\\(Self.printable(escape))'")
                }
            default:
                if byte < 0x20 { throw error("control character in string") }
                scratch.append(byte)
                index += 1
            }
        }
        throw error("unexpected end of input in string")
    }

    private mutating func readHex4() throws(JSONSyntaxError) -> UInt32 {
        guard index + 4 <= bytes.count else { throw error("unexpected end of input in \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[index]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw error("invalid hex digit in \\u escape")
            }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }

    /// Reads a number and classifies it exactly as a whole number (or not).
    ///
    /// `1.0`, `1e3` and `15.0e-1`... are whole numbers when their value is,
    /// matching JSON Schema's definition of "integer".
    mutating func readInteger() throws(JSONSyntaxError) -> JSONInteger {
        skipWhitespace()
        // Fast path: a plain non-negative integer of at most 16 digits, the usual token count.
        let start = index
        var fast: Int64 = 0
        var digitCount = 0
        while index < bytes.count, Self.isDigit(bytes[index]), digitCount < 17 {
            fast = fast * 10 + Int64(bytes[index] - UInt8(ascii: "0"))
            digitCount += 1
            index += 1
        }
        if digitCount > 0 && digitCount <= 16 && !(digitCount > 1 && bytes[start] == UInt8(ascii: "0")) {
            let next = index < bytes.count ? bytes[index] : 0x20
            if next != UInt8(ascii: ".") && next != UInt8(ascii: "e") && next != UInt8(ascii: "E") && !Self.isDigit(next) {
                return fast > Self.maxInteger ? .outOfRange(negative: false) : .value(fast)
            }
        }
        index = start
        var negative = false
        if index < bytes.count && bytes[index] == UInt8(ascii: "-") { negative = true; index += 1 }
        var digits: [UInt8] = []
        guard index < bytes.count, Self.isDigit(bytes[index]) else { throw error("invalid number") }
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
            if index < bytes.count && Self.isDigit(bytes[index]) { throw error("leading zero in number") }
            digits.append(0)
        } else {
            while index < bytes.count && Self.isDigit(bytes[index]) {
                digits.append(bytes[index] - UInt8(ascii: "0"))
                index += 1
            }
        }
        var exponent = 0
        if index < bytes.count && bytes[index] == UInt8(ascii: ".") {
            index += 1
            guard index < bytes.count, Self.isDigit(bytes[index]) else { throw error("digit expected after decimal point") }
            while index < bytes.count && Self.isDigit(bytes[index]) {
                digits.append(bytes[index] - UInt8(ascii: "0"))
                exponent -= 1
                index += 1
            }
        }
        if index < bytes.count && (bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E")) {
            index += 1
            var exponentNegative = false
            if index < bytes.count && (bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-")) {
                exponentNegative = bytes[index] == UInt8(ascii: "-")
                index += 1
            }
            guard index < bytes.count, Self.isDigit(bytes[index]) else { throw error("digit expected in exponent") }
            var value = 0
            while index < bytes.count && Self.isDigit(bytes[index]) {
                // Saturate: any exponent this large decides the outcome already.
                value = min(value * 10 + Int(bytes[index] - UInt8(ascii: "0")), 1_000_000)
                index += 1
            }
            exponent += exponentNegative ? -value : value
        }
        // Normalize: drop leading zeros and trailing zeros (moving them into the exponent).
        var first = 0
        while first < digits.count - 1 && digits[first] == 0 { first += 1 }
        var last = digits.count
        while last > first + 1 && digits[last - 1] == 0 { last -= 1; exponent += 1 }
        let significant = digits[first..<last]
        if significant.count == 1 && significant.first == 0 { return .value(0) }
        if exponent < 0 { return .fractional }
        if significant.count + exponent > 16 { return .outOfRange(negative: negative) }
        var value: Int64 = 0
        for digit in significant { value = value * 10 + Int64(digit) }
        for _ in 0..<exponent { value *= 10 }
        if value > Self.maxInteger { return .outOfRange(negative: negative) }
        return .value(negative ? -value : value)
    }

    /// Skips any value, returning the exact bytes it spanned.
    @discardableResult
    mutating func skipValue(depth: Int = 0) throws(JSONSyntaxError) -> Range<Int> {
        guard depth < Self.maxDepth else { throw error("nesting deeper than \(Self.maxDepth)") }
        let kind = try peekKind()
        let start = index
        switch kind {
        case .object:
            var keys = Set<String>()
            try readObject { (reader: inout JSONReader, key: String) throws(JSONSyntaxError) in
                guard keys.insert(key).inserted else { throw reader.error("duplicate key \"\(key)\"") }
                try reader.skipValue(depth: depth + 1)
            }
        case .array:
            index += 1
            if !consumeIf(UInt8(ascii: "]")) {
                repeat { try skipValue(depth: depth + 1) } while consumeIf(UInt8(ascii: ","))
                try consume(UInt8(ascii: "]"))
            }
        case .string:
            _ = try readString()
        case .number:
            _ = try readInteger()
        case .bool, .null:
            _ = try readLiteral()
        }
        return start..<index
    }

    /// Reads `true`, `false` or `null`; returns nil for null.
    mutating func readLiteral() throws(JSONSyntaxError) -> Bool? {
        skipWhitespace()
        for (word, value) in [("true", true as Bool?), ("false", false), ("null", nil)] {
            let utf8 = Array(word.utf8)
            if index + utf8.count <= bytes.count && Array(bytes[index..<index + utf8.count]) == utf8 {
                index += utf8.count
                return value
            }
        }
        throw error("invalid literal")
    }

    /// Checks that nothing but whitespace follows the value.
    mutating func finish() throws(JSONSyntaxError) {
        skipWhitespace()
        if index < bytes.count { throw error("unexpected data after the JSON value") }
    }

    static func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

    static func printable(_ byte: UInt8) -> String {
        byte >= 0x20 && byte < 0x7f ? String(UnicodeScalar(byte)) : "\\u{\(String(byte, radix: 16))}"
    }
}
