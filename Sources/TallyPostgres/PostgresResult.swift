import CLibpq

/// The rows of one statement's result. Owns the `PGresult` and frees it in `deinit`.
public final class PostgresResult: @unchecked Sendable {
    private let result: OpaquePointer
    public let rowCount: Int
    public let columnCount: Int
    /// Rows touched by INSERT/UPDATE/DELETE, from the command tag.
    public let affectedRows: Int

    init(_ result: OpaquePointer) {
        self.result = result
        rowCount = Int(PQntuples(result))
        columnCount = Int(PQnfields(result))
        affectedRows = Int(String(cString: PQcmdTuples(result))) ?? 0
    }

    deinit { PQclear(result) }

    public func columnName(_ column: Int) -> String {
        String(cString: PQfname(result, Int32(column)))
    }

    public func isNull(_ row: Int, _ column: Int) -> Bool {
        PQgetisnull(result, Int32(row), Int32(column)) != 0
    }

    /// The value as PostgreSQL's text output, or nil for NULL.
    public func string(_ row: Int, _ column: Int) -> String? {
        if isNull(row, column) { return nil }
        return String(cString: PQgetvalue(result, Int32(row), Int32(column)))
    }

    public func int64(_ row: Int, _ column: Int) throws(PostgresError) -> Int64? {
        guard let text = string(row, column) else { return nil }
        guard let value = Int64(text) else {
            throw PostgresError(code: .decoding, message: "column \(columnName(column)) is not an integer")
        }
        return value
    }

    /// A `numeric` (or any integer) column with no fraction, as 128 bits: window sums exceed `Int64`.
    public func int128(_ row: Int, _ column: Int) throws(PostgresError) -> Int128? {
        guard let text = string(row, column) else { return nil }
        guard let value = Int128(text) else {
            throw PostgresError(code: .decoding, message: "column \(columnName(column)) is not an integer of at most 38 digits")
        }
        return value
    }

    public func bool(_ row: Int, _ column: Int) -> Bool? {
        string(row, column).map { $0 == "t" }
    }

    /// A column's value that must be present: NULL or text that is not a `T` throws a
    /// `.decoding` error naming the column, so an unexpected row stops one statement, never the process.
    public func value<T: PostgresColumnDecodable>(_ row: Int, _ column: Int, as type: T.Type = T.self) throws(PostgresError) -> T {
        guard let value = try T.decode(self, row: row, column: column) else {
            throw PostgresError(code: .decoding, message: "column \(columnName(column)) is NULL; a \(T.self) was expected")
        }
        return value
    }

    /// A column whose text `parse` must accept (a currency code, an enum's raw value); NULL or
    /// text it refuses throws a `.decoding` error naming the column.
    public func value<T>(_ row: Int, _ column: Int, parsedBy parse: (String) -> T?) throws(PostgresError) -> T {
        let text = try value(row, column, as: String.self)
        guard let parsed = parse(text) else {
            throw PostgresError(code: .decoding, message: "column \(columnName(column)): \"\(text.prefix(64))\" is not a valid \(T.self)")
        }
        return parsed
    }

    /// All rows as text, in column order; for tools and tests.
    public var rows: [[String?]] {
        (0..<rowCount).map { row in (0..<columnCount).map { string(row, $0) } }
    }

    /// The first column of the first row; nil when there is none or it is NULL.
    public var scalar: String? {
        rowCount > 0 && columnCount > 0 ? string(0, 0) : nil
    }
}

/// A Swift type a column's text output decodes to (`PostgresResult.value`).
public protocol PostgresColumnDecodable {
    /// The value, nil for NULL; throws when the text is not one.
    static func decode(_ result: PostgresResult, row: Int, column: Int) throws(PostgresError) -> Self?
}

extension String: PostgresColumnDecodable {
    public static func decode(_ result: PostgresResult, row: Int, column: Int) throws(PostgresError) -> String? { result.string(row, column) }
}

extension Int64: PostgresColumnDecodable {
    public static func decode(_ result: PostgresResult, row: Int, column: Int) throws(PostgresError) -> Int64? { try result.int64(row, column) }
}

extension Int128: PostgresColumnDecodable {
    public static func decode(_ result: PostgresResult, row: Int, column: Int) throws(PostgresError) -> Int128? { try result.int128(row, column) }
}

extension Int32: PostgresColumnDecodable {
    public static func decode(_ result: PostgresResult, row: Int, column: Int) throws(PostgresError) -> Int32? {
        guard let wide = try result.int64(row, column) else { return nil }
        guard let value = Int32(exactly: wide) else {
            throw PostgresError(code: .decoding, message: "column \(result.columnName(column)) does not fit 32 bits")
        }
        return value
    }
}

extension Int: PostgresColumnDecodable {
    public static func decode(_ result: PostgresResult, row: Int, column: Int) throws(PostgresError) -> Int? {
        try result.int64(row, column).map { Int($0) }
    }
}

extension Bool: PostgresColumnDecodable {
    public static func decode(_ result: PostgresResult, row: Int, column: Int) throws(PostgresError) -> Bool? { result.bool(row, column) }
}
