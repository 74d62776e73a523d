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
    public let settings: [(name: String, value: String)]

    /// Connects, retrying with backoff until `connectTimeout` runs out.
    ///
    /// - Parameter url: a `postgresql://` URI or a `key=value` conninfo string.
    /// - Parameter settings: session settings (`work_mem`, `statement_timeout`…) made on every (re)connection.
    public init(url: String, logger: Logger, connectTimeout: Duration = .seconds(30), searchPath: String? = nil,
                settings: [(name: String, value: String)] = []) throws(PostgresError) {
        conninfo = url
        self.logger = logger
        self.connectTimeout = connectTimeout
        self.searchPath = searchPath
        self.settings = settings
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
                for setting in settings { try query("SELECT set_config($1, $2, false)", [setting.name, setting.value]) }
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
        try copyIn(sql, format: .text, rows: rows) { row, fields in
            for value in row { fields.add(value) }
        }
    }

    /// COPY … FROM STDIN, each row written by `encode` straight into the outgoing buffer (no
    /// strings per field). Sent in 64 KiB pieces while later rows are still being encoded, so
    /// the server inserts while we format. For `.binary`, the statement must say
    /// `WITH (FORMAT binary)` and each field must match its column's type exactly; the server
    /// then parses no numbers or timestamps.
    @discardableResult
    public func copyIn<Rows: Sequence>(_ sql: String, format: CopyFields.Format, rows: Rows,
                                       encode: (Rows.Element, inout CopyFields) -> Void) throws(PostgresError) -> Int {
        let connection = try live()
        _ = try checkCopyStart(PQexec(connection, sql), connection: connection)
        var fields = CopyFields(format: format)
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
            fields.startRow()
            encode(row, &fields)
            fields.endRow()
            if fields.buffer.count >= 1 << 16 { try send() }
        }
        fields.end()
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

/// The fields of COPY rows, appended in column order, in text or binary format.
public struct CopyFields {
    public enum Format: Sendable { case text, binary }

    public let format: Format
    var buffer: [UInt8] = []
    private var fieldsInRow = 0
    /// Binary: where the row's field count goes once the row is complete.
    private var rowStart = 0
    /// Binary timestamps count from 2000-01-01 UTC.
    private static let postgresEpochMicroseconds: Int64 = 946_684_800_000_000

    init(format: Format) {
        self.format = format
        buffer.reserveCapacity(1 << 16 + 4096)
        if format == .binary {
            buffer.append(contentsOf: Array("PGCOPY\n".utf8) + [0xff, 0x0d, 0x0a, 0x00])
            append(Int32(0))  // flags
            append(Int32(0))  // header extension length
        }
    }

    public mutating func add(_ value: String?) {
        guard let value else { return addNull() }
        beginField()
        switch format {
        case .text:
            for byte in value.utf8 {
                switch byte {
                case 0x5c: buffer.append(contentsOf: [0x5c, 0x5c])
                case 0x09: buffer.append(contentsOf: [0x5c, 0x74])
                case 0x0a: buffer.append(contentsOf: [0x5c, 0x6e])
                case 0x0d: buffer.append(contentsOf: [0x5c, 0x72])
                default: buffer.append(byte)
                }
            }
        case .binary:
            append(Int32(value.utf8.count))
            buffer.append(contentsOf: value.utf8)
        }
    }

    /// A bigint column.
    public mutating func add(_ value: Int64) {
        beginField()
        switch format {
        case .text: appendDecimal(value)
        case .binary: append(Int32(8)); append(value)
        }
    }

    /// An integer column.
    public mutating func add(_ value: Int32) {
        beginField()
        switch format {
        case .text: appendDecimal(Int64(value))
        case .binary: append(Int32(4)); append(value)
        }
    }

    public mutating func add(_ value: Int64?) { if let value { add(value) } else { addNull() } }

    /// A timestamptz column (binary format only), from microseconds since 1970-01-01 UTC.
    public mutating func add(timestampMicroseconds value: Int64?) {
        precondition(format == .binary, "timestamps are written in binary COPY only")
        add(value.map { $0 - Self.postgresEpochMicroseconds })
    }

    public mutating func addNull() {
        beginField()
        switch format {
        case .text: buffer.append(contentsOf: [0x5c, 0x4e])
        case .binary: append(Int32(-1))
        }
    }

    mutating func startRow() {
        fieldsInRow = 0
        rowStart = buffer.count
        if format == .binary { append(Int16(0)) }
    }

    mutating func endRow() {
        switch format {
        case .text:
            buffer.append(0x0a)
        case .binary:
            let count = UInt16(fieldsInRow)
            buffer[rowStart] = UInt8(count >> 8)
            buffer[rowStart + 1] = UInt8(truncatingIfNeeded: count)
        }
    }

    /// Binary: the trailer.
    mutating func end() {
        if format == .binary { append(Int16(-1)) }
    }

    /// Counts the field (binary rows carry the count) and, in text, separates it from the last.
    private mutating func beginField() {
        if format == .text && fieldsInRow > 0 { buffer.append(0x09) }
        fieldsInRow += 1
    }

    private mutating func append<Integer: FixedWidthInteger>(_ value: Integer) {
        withUnsafeBytes(of: value.bigEndian) { buffer.append(contentsOf: $0) }
    }

    private mutating func appendDecimal(_ value: Int64) {
        var magnitude = value.magnitude
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
