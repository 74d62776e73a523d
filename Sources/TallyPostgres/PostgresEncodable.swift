/// A value bound as a query parameter, sent in PostgreSQL's text format.
public protocol PostgresEncodable: Sendable {
    var postgresText: String { get }
}

extension String: PostgresEncodable { public var postgresText: String { self } }
extension Substring: PostgresEncodable { public var postgresText: String { String(self) } }
extension Int: PostgresEncodable { public var postgresText: String { String(self) } }
extension Int64: PostgresEncodable { public var postgresText: String { String(self) } }
extension Int32: PostgresEncodable { public var postgresText: String { String(self) } }
extension Bool: PostgresEncodable { public var postgresText: String { self ? "t" : "f" } }

/// Bytes bound as `bytea` (hex format).
public struct PostgresBytes: PostgresEncodable {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var postgresText: String {
        var text = "\\x"
        text.reserveCapacity(2 + bytes.count * 2)
        let digits = Array("0123456789abcdef".utf8)
        var utf8: [UInt8] = []
        utf8.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            utf8.append(digits[Int(byte >> 4)])
            utf8.append(digits[Int(byte & 0x0f)])
        }
        text += String(decoding: utf8, as: UTF8.self)
        return text
    }
}

/// A one-dimensional array parameter (`$1::text[]`, `$2::bigint[]`), the batch fast path:
/// `INSERT … SELECT * FROM unnest($1::text[], $2::bigint[])` binds thousands of rows in one round trip.
public struct PostgresArray: PostgresEncodable {
    public let elements: [String?]

    public init(_ elements: [String?]) { self.elements = elements }
    public init(_ elements: [String]) { self.elements = elements }
    public init(_ elements: [Int64]) { self.elements = elements.map { String($0) } }
    public init(_ elements: [Int32]) { self.elements = elements.map { String($0) } }
    public init(_ elements: [Int]) { self.elements = elements.map { String($0) } }

    public var postgresText: String {
        // Built as UTF-8 bytes: batches bind thousands of elements per statement.
        var bytes: [UInt8] = [UInt8(ascii: "{")]
        bytes.reserveCapacity(elements.count * 16)
        for (index, element) in elements.enumerated() {
            if index > 0 { bytes.append(UInt8(ascii: ",")) }
            guard let element else { bytes.append(contentsOf: "NULL".utf8); continue }
            bytes.append(UInt8(ascii: "\""))
            for byte in element.utf8 {
                if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") { bytes.append(UInt8(ascii: "\\")) }
                bytes.append(byte)
            }
            bytes.append(UInt8(ascii: "\""))
        }
        bytes.append(UInt8(ascii: "}"))
        return String(decoding: bytes, as: UTF8.self)
    }
}
