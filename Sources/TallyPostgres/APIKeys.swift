import Foundation

/// What an API key may do (docs/api.md#keys-and-scopes).
public enum APIScope: String, Sendable, CaseIterable, Comparable {
    /// Send usage: `/v1/events`, `/v1/usage/{provider}`, the gateway routes, `/v1/check`.
    case ingest
    /// Grant and void credit, declare budgets.
    case grants
    /// Read usage, balances, invoices and alerts (a customer's key: its own customer only).
    case read
    /// Everything, for every customer: customer lists, price books, consumer positions.
    case admin

    public static func < (a: APIScope, b: APIScope) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// An API key as stored (never the key itself).
public struct APIKeyRecord: Sendable, Equatable {
    public let keyID: String
    public let name: String
    public let environment: String?
    public let createdAt: String
    public let revokedAt: String?
    /// What the key may do; `admin` may do everything.
    public let scopes: Set<APIScope>
    /// May post wallet grants and budgets.
    public var mayGrant: Bool { allows(.grants) }
    /// The customer a gateway call with this key is metered for, when the key is a customer's.
    public let customerID: String?
    /// May name whom a gateway call is for in the gateway's customer header (keys without a customer only).
    public let mayNameCustomer: Bool
    /// When the key lapses (RFC 3339 text from PostgreSQL), nil for never.
    public let expiresAt: String?

    /// True when the key has `scope` or is an admin key.
    public func allows(_ scope: APIScope) -> Bool {
        scopes.contains(scope) || scopes.contains(.admin)
    }
}

/// Ingest API keys in `tally.api_keys`: created, listed, revoked, and checked by hash.
///
/// Keys look like `tally_<id>_<secret>`; PostgreSQL's `sha256()` hashes them, so no
/// key is ever stored or logged.
public struct APIKeyStore {
    private let connection: PostgresConnection

    public init(connection: PostgresConnection) {
        self.connection = connection
    }

    /// Creates a key and returns it; this is the only time it is visible.
    /// - Parameters:
    ///   - scopes: what the key may do (at least one).
    ///   - expiresAt: microseconds since the epoch after which the key is refused (portal tokens), nil for never.
    public func create(name: String, environment: String?, scopes: Set<APIScope> = [.ingest], customerID: String? = nil,
                       mayNameCustomer: Bool = false, expiresAt: Int64? = nil) throws -> (key: String, record: APIKeyRecord) {
        var generator = SystemRandomNumberGenerator()
        func hex(_ count: Int) -> String {
            (0..<count).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        }
        let keyID = hex(4)
        let key = "tally_\(keyID)_\(hex(24))"
        let result = try connection.query("""
            INSERT INTO tally.api_keys (key_id, key_hash, name, environment, may_grant, customer_id, may_name_customer, scopes, expires_at)
            VALUES ($1, sha256(convert_to($2, 'UTF8')), $3, $4, $5, $6, $7, string_to_array($8, ','),
                    to_timestamp($9::bigint / 1000000.0))
            RETURNING \(Self.columns)
            """, [keyID, key, name, environment, scopes.contains(.grants), customerID, mayNameCustomer,
                  scopes.sorted().map(\.rawValue).joined(separator: ","), expiresAt])
        return (key, Self.record(result, 0))
    }

    public func list() throws -> [APIKeyRecord] {
        let result = try connection.query("SELECT \(Self.columns) FROM tally.api_keys ORDER BY created_at, key_id")
        return (0..<result.rowCount).map { Self.record(result, $0) }
    }

    /// Revokes a key by id; false when there is no such live key.
    public func revoke(keyID: String) throws -> Bool {
        try connection.query("UPDATE tally.api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL", [keyID]).affectedRows == 1
    }

    /// True when `key` has the shape every key has (`tally_` + 8 + `_` + 48 lower-case hex
    /// digits): anything else is refused without a look-up, and never cached.
    public static func isWellFormed(_ key: String) -> Bool {
        let bytes = Array(key.utf8)
        guard bytes.count == 63, bytes.starts(with: Array("tally_".utf8)), bytes[14] == UInt8(ascii: "_") else { return false }
        return (bytes[6..<14] + bytes[15...]).allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    /// The live key matching `key`, or nil.
    public func authenticate(_ key: String) throws -> APIKeyRecord? {
        let result = try connection.query("""
            SELECT \(Self.columns) FROM tally.api_keys
            WHERE key_hash = sha256(convert_to($1, 'UTF8')) AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
            """, [key])
        return result.rowCount == 1 ? Self.record(result, 0) : nil
    }

    private static let columns = """
        key_id, name, environment, created_at::text, revoked_at::text, array_to_string(scopes, ','), customer_id, may_name_customer,
        to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
        """

    private static func record(_ result: PostgresResult, _ row: Int) -> APIKeyRecord {
        APIKeyRecord(keyID: result.string(row, 0) ?? "", name: result.string(row, 1) ?? "", environment: result.string(row, 2),
                     createdAt: result.string(row, 3) ?? "", revokedAt: result.string(row, 4),
                     scopes: Set((result.string(row, 5) ?? "").split(separator: ",").compactMap { APIScope(rawValue: String($0)) }),
                     customerID: result.string(row, 6), mayNameCustomer: result.bool(row, 7) ?? false, expiresAt: result.string(row, 8))
    }
}
