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

    /// All rows as text, in column order; for tools and tests.
    public var rows: [[String?]] {
        (0..<rowCount).map { row in (0..<columnCount).map { string(row, $0) } }
    }

    /// The first column of the first row; nil when there is none or it is NULL.
    public var scalar: String? {
        rowCount > 0 && columnCount > 0 ? string(0, 0) : nil
    }
}
