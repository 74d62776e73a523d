/// An error from PostgreSQL or libpq, with the server's SQLSTATE when there is one.
///
/// `description` holds the server's primary message but never its DETAIL
/// line, which can quote row values (tenant data); `detail` keeps it for logs
/// that are allowed to carry it.
public struct PostgresError: Error, CustomStringConvertible, Sendable {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// Could not connect within the allowed time.
        public static let connectionFailed = Code("connection_failed")
        /// The connection broke during an operation; the operation's effect is unknown
        /// unless it was inside a transaction (then it was rolled back).
        public static let connectionLost = Code("connection_lost")
        /// The server rejected the statement.
        public static let server = Code("server")
        /// A result did not have the expected shape or type.
        public static let decoding = Code("decoding")
    }

    public let code: Code
    public let message: String
    /// Five-character SQLSTATE from the server (e.g. `23505` unique violation).
    public let sqlState: String?
    public let detail: String?
    public let file: String
    public let line: UInt

    init(code: Code, message: String, sqlState: String? = nil, detail: String? = nil,
         file: String = #fileID, line: UInt = #line) {
        self.code = code
        self.message = message
        self.sqlState = sqlState
        self.detail = detail
        self.file = file
        self.line = line
    }

    /// True when running the same work again (on a fresh connection) may succeed.
    public var isRetryable: Bool {
        if code == .connectionFailed || code == .connectionLost { return true }
        guard let sqlState else { return false }
        // 08: connection exception; 40001/40P01: serialization failure, deadlock;
        // 57P01-57P03: admin shutdown, crash shutdown, cannot connect now.
        return sqlState.hasPrefix("08") || ["40001", "40P01", "57P01", "57P02", "57P03"].contains(sqlState)
    }

    public var description: String {
        var text = "PostgresError(\(code)"
        if let sqlState { text += ", SQLSTATE \(sqlState)" }
        return text + "): \(message)"
    }
}
