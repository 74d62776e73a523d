import CLibpq
import Foundation
import Logging

/// One PostgreSQL session over libpq that reconnects by itself after the server restarts.
///
/// Every statement is sent with bound parameters (`$1`, `$2`, …); SQL text is
/// never built from values. Calls block, so use the connection from a thread
/// of its own (a consumer loop or a command-line tool), never from Swift's
/// cooperative pool.
///
/// - Important: not thread-safe; one user at a time. When the connection
///   breaks, the failing call throws `.connectionLost` (retryable) and the next
///   call reconnects. Work inside a broken transaction was rolled back by the
///   server, except a COMMIT whose reply was lost: its outcome is unknown, which
///   is why Tally's offset writes are compare-and-set.
public final class PostgresConnection: @unchecked Sendable {
    private var connection: OpaquePointer?
    /// Set when an error showed the connection is gone though libpq's status may still say OK
    /// (e.g. the server vanished during COPY): the next statement reconnects.
    private var broken = false
    private let conninfo: String
    private let logger: Logger
    /// How long a (re)connect keeps trying before it gives up.
    public var connectTimeout: Duration
    public private(set) var reconnectCount = 0
    /// The schema unqualified table names resolve to, set on every (re)connect.
    /// Bound as a parameter (`set_config`), never spliced into SQL.
    public let searchPath: String?

    /// Connects, retrying with backoff until `connectTimeout` runs out.
    ///
    /// - Parameter url: a `postgresql://` URI or a `key=value` conninfo string.
    public init(url: String, logger: Logger, connectTimeout: Duration = .seconds(30), searchPath: String? = nil) throws(PostgresError) {
        conninfo = url
        self.logger = logger
        self.connectTimeout = connectTimeout
        self.searchPath = searchPath
        try connect()
    }

    deinit {
        if let connection { PQfinish(connection) }
    }

    private func connect() throws(PostgresError) {
        if let connection { PQfinish(connection) }
        connection = nil
        let deadline = ContinuousClock.now + connectTimeout
        var delay = Duration.milliseconds(50)
        var lastError = ""
        while true {
            let candidate = PQconnectdb(conninfo)
            if let candidate, PQstatus(candidate) == CONNECTION_OK {
                PQsetNoticeProcessor(candidate, { _, _ in }, nil)
                connection = candidate
                if let searchPath {
                    try query("SELECT set_config('search_path', $1, false)", [searchPath])
                }
                return
            }
            lastError = candidate.map { String(cString: PQerrorMessage($0)) } ?? "out of memory"
            if let candidate { PQfinish(candidate) }
            if ContinuousClock.now + delay > deadline { break }
            Thread.sleep(forTimeInterval: Double(delay.milliseconds) / 1000)
            delay = min(delay * 2, .seconds(1))
        }
        throw PostgresError(code: .connectionFailed,
                            message: "could not connect to PostgreSQL within \(connectTimeout): \(lastError.trimmingCharacters(in: .whitespacesAndNewlines))")
    }

    /// The live connection, reconnecting first if the last one broke.
    private func live() throws(PostgresError) -> OpaquePointer {
        if let connection, PQstatus(connection) == CONNECTION_OK, !broken { return connection }
        logger.warning("PostgreSQL connection lost; reconnecting")
        broken = false
        try connect()
        reconnectCount += 1
        return connection!
    }

    /// Runs one statement with bound parameters and returns its rows.
    @discardableResult
    public func query(_ sql: String, _ parameters: [(any PostgresEncodable)?] = []) throws(PostgresError) -> PostgresResult {
        let connection = try live()
        let texts = parameters.map { $0?.postgresText }
        let result = withCStringArray(texts) { values in
            PQexecParams(connection, sql, Int32(texts.count), nil, values, nil, nil, 0)
        }
        return try check(result, connection: connection)
    }

    /// Runs a script of several statements (simple query protocol, no parameters): migrations only.
    public func execute(script: String) throws(PostgresError) {
        let connection = try live()
        _ = try check(PQexec(connection, script), connection: connection)
    }

    /// Runs `body` in a transaction: COMMIT when it returns, ROLLBACK when it throws.
    public func transaction<T>(_ body: (PostgresConnection) throws -> T) throws -> T {
        try query("BEGIN")
        let value: T
        do {
            value = try body(self)
        } catch {
            // A broken connection has no transaction left to roll back.
            if let connection, PQstatus(connection) == CONNECTION_OK, !broken { _ = try? query("ROLLBACK") }
            throw error
        }
        try query("COMMIT")
        return value
    }

    /// Loads rows with `COPY … FROM STDIN` (text format), the fastest bulk path.
    ///
    /// - Parameters:
    ///   - sql: the COPY statement, e.g. `COPY tally.t (a, b) FROM STDIN`.
    ///   - rows: each row's values as text; nil is NULL.
    /// - Returns: the number of rows copied.
    @discardableResult
    public func copyIn(_ sql: String, rows: [[String?]]) throws(PostgresError) -> Int {
        try copyIn(sql, rows: rows) { row, fields in
            for value in row { fields.add(value) }
        }
    }

    /// COPY … FROM STDIN in text format, each row written by `encode` straight into the
    /// outgoing buffer (no strings per field). Sent in 64 KiB pieces while later rows are
    /// still being encoded, so the server inserts while we format.
    @discardableResult
    public func copyIn<Rows: Sequence>(_ sql: String, rows: Rows,
                                       encode: (Rows.Element, inout CopyFields) -> Void) throws(PostgresError) -> Int {
        let connection = try live()
        _ = try checkCopyStart(PQexec(connection, sql), connection: connection)
        var fields = CopyFields()
        fields.buffer.reserveCapacity(1 << 16 + 4096)
        func send() throws(PostgresError) {
            let ok = fields.buffer.withUnsafeBufferPointer { bytes in
                bytes.baseAddress!.withMemoryRebound(to: CChar.self, capacity: bytes.count) {
                    PQputCopyData(connection, $0, Int32(bytes.count))
                }
            }
            if ok != 1 { throw lostOrFailed(connection) }
            fields.buffer.removeAll(keepingCapacity: true)
        }
        for row in rows {
            encode(row, &fields)
            fields.endRow()
            if fields.buffer.count >= 1 << 16 { try send() }
        }
        if !fields.buffer.isEmpty { try send() }
        if PQputCopyEnd(connection, nil) != 1 { throw lostOrFailed(connection) }
        var copied = 0
        var failure: PostgresError?
        while let result = PQgetResult(connection) {
            do {
                let checked = try check(result, connection: connection)
                copied = checked.affectedRows
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        return copied
    }

    private func checkCopyStart(_ result: OpaquePointer?, connection: OpaquePointer) throws(PostgresError) -> Void {
        guard let result else { throw lostOrFailed(connection) }
        defer { PQclear(result) }
        if PQresultStatus(result) != PGRES_COPY_IN { throw serverError(result, connection: connection) }
    }

    private func check(_ result: OpaquePointer?, connection: OpaquePointer) throws(PostgresError) -> PostgresResult {
        guard let result else { throw lostOrFailed(connection) }
        switch PQresultStatus(result) {
        case PGRES_COMMAND_OK, PGRES_TUPLES_OK, PGRES_EMPTY_QUERY:
            return PostgresResult(result)
        default:
            let error = serverError(result, connection: connection)
            PQclear(result)
            throw error
        }
    }

    private func serverError(_ result: OpaquePointer, connection: OpaquePointer) -> PostgresError {
        let field = { (code: UInt8) -> String? in
            PQresultErrorField(result, Int32(code)).map { String(cString: $0) }
        }
        let sqlState = field(UInt8(ascii: "C"))
        let message = field(UInt8(ascii: "M")) ?? String(cString: PQerrorMessage(connection))
        // The server sends a SQLSTATE with every error; one without is libpq's own: the
        // connection failed under the statement.
        if PQstatus(connection) != CONNECTION_OK || sqlState == nil {
            broken = true
            return PostgresError(code: .connectionLost, message: message.trimmingCharacters(in: .whitespacesAndNewlines), sqlState: sqlState)
        }
        return PostgresError(code: .server, message: message, sqlState: sqlState, detail: field(UInt8(ascii: "D")))
    }

    /// No result at all, or COPY data that could not be sent: libpq lost the connection.
    private func lostOrFailed(_ connection: OpaquePointer) -> PostgresError {
        broken = true
        return PostgresError(code: .connectionLost, message: String(cString: PQerrorMessage(connection)).trimmingCharacters(in: .whitespacesAndNewlines))
    }
}

extension PostgresConnection {
    /// Runs `body`, and again on a fresh connection while it fails with a retryable error,
    /// until `timeout` runs out. `body` must be safe to repeat (a whole transaction is).
    public func retrying<T>(timeout: Duration = .seconds(60), _ body: (PostgresConnection) throws -> T) throws -> T {
        let deadline = ContinuousClock.now + timeout
        while true {
            do {
                return try body(self)
            } catch let error as PostgresError where error.isRetryable && ContinuousClock.now < deadline {
                logger.warning("retrying after PostgreSQL error: \(error)")
                Thread.sleep(forTimeInterval: 0.2)
            }
        }
    }
}

/// COPY text-format escaping: backslash, tab, newline and carriage return.
/// The fields of COPY rows in text format, appended in column order.
public struct CopyFields {
    var buffer: [UInt8] = []
    private var startsRow = true

    public mutating func add(_ value: String?) {
        separate()
        guard let value else { buffer.append(contentsOf: [0x5c, 0x4e]); return }
        for byte in value.utf8 {
            switch byte {
            case 0x5c: buffer.append(contentsOf: [0x5c, 0x5c])
            case 0x09: buffer.append(contentsOf: [0x5c, 0x74])
            case 0x0a: buffer.append(contentsOf: [0x5c, 0x6e])
            case 0x0d: buffer.append(contentsOf: [0x5c, 0x72])
            default: buffer.append(byte)
            }
        }
    }

    public mutating func add<Number: BinaryInteger>(_ value: Number) {
        separate()
        var magnitude = UInt64(value.magnitude)
        if value < 0 { buffer.append(0x2d) }
        // Digits in reverse into a fixed tuple (20 fit), then copied out: no allocation.
        var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)
        withUnsafeMutableBytes(of: &digits) { scratch in
            var index = scratch.count
            repeat {
                index -= 1
                scratch[index] = 0x30 + UInt8(magnitude % 10)
                magnitude /= 10
            } while magnitude > 0
            buffer.append(contentsOf: scratch[index...])
        }
    }

    public mutating func add<Number: BinaryInteger>(_ value: Number?) {
        if let value { add(value) } else { add(nil as String?) }
    }

    private mutating func separate() {
        if startsRow { startsRow = false } else { buffer.append(0x09) }
    }

    mutating func endRow() {
        buffer.append(0x0a)
        startsRow = true
    }
}

/// Calls `body` with a C array of C strings (nil entries stay NULL); the pointers live only inside `body`.
func withCStringArray<R>(_ strings: [String?], _ body: (UnsafePointer<UnsafePointer<CChar>?>?) -> R) -> R {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { $0.map { strdup($0) } ?? nil }
    defer { for pointer in pointers { free(pointer) } }
    return pointers.withUnsafeMutableBufferPointer { buffer in
        buffer.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: max(buffer.count, 1)) { body($0) }
    }
}

extension Duration {
    var milliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }
}
