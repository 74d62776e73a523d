import Foundation
import Logging

/// One versioned SQL migration shipped with Tally.
public struct Migration: Sendable {
    public let version: Int
    public let name: String
    public let sql: String

    /// FNV-1a of the SQL, to notice a migration edited after it was applied.
    public var checksum: String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in sql.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        return String(hash, radix: 16)
    }
}

/// Applies the migrations in `Migrations/` to schema `tally`, each once, in version order.
public struct Migrator {
    private let connection: PostgresConnection
    private let logger: Logger

    public init(connection: PostgresConnection, logger: Logger) {
        self.connection = connection
        self.logger = logger
    }

    /// The migrations bundled with this build, sorted by version (file names `NNNN_name.sql`).
    public static func bundled() throws -> [Migration] {
        guard let folder = Bundle.module.url(forResource: "Migrations", withExtension: nil) else {
            throw PostgresError(code: .decoding, message: "migrations folder missing from the bundle")
        }
        let files = try FileManager.default.contentsOfDirectory(at: folder, includingPropertiesForKeys: nil)
            .filter { $0.pathExtension == "sql" }
        return try files.map { url in
            let base = url.deletingPathExtension().lastPathComponent
            guard let underscore = base.firstIndex(of: "_"), let version = Int(base[..<underscore]) else {
                throw PostgresError(code: .decoding, message: "migration file \(url.lastPathComponent) is not named NNNN_name.sql")
            }
            return Migration(version: version, name: String(base[base.index(after: underscore)...]),
                             sql: try String(contentsOf: url, encoding: .utf8))
        }.sorted { $0.version < $1.version }
    }

    /// Applies what is missing; returns the versions applied now.
    ///
    /// Safe to run concurrently from several processes: an advisory lock serializes them.
    @discardableResult
    public func migrate(_ migrations: [Migration]) throws -> [Int] {
        try connection.execute(script: """
            CREATE SCHEMA IF NOT EXISTS tally;
            CREATE TABLE IF NOT EXISTS tally.schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """)
        return try connection.transaction { connection in
            // Any constant works; it only has to be the same for every Tally process.
            try connection.query("SELECT pg_advisory_xact_lock($1)", [Int64(0x7461_6c6c_7921)])
            let applied = try connection.query("SELECT version, checksum FROM tally.schema_migrations")
            var checksums: [Int: String] = [:]
            for row in 0..<applied.rowCount {
                checksums[Int(try applied.value(row, 0, as: Int64.self))] = applied.string(row, 1)
            }
            var appliedNow: [Int] = []
            for migration in migrations {
                if let recorded = checksums[migration.version] {
                    if recorded != migration.checksum {
                        throw PostgresError(code: .server, message: "migration \(migration.version)_\(migration.name) changed after it was applied (checksum \(recorded) → \(migration.checksum))")
                    }
                    continue
                }
                logger.info("applying migration \(migration.version)_\(migration.name)")
                try connection.execute(script: migration.sql)
                try connection.query("INSERT INTO tally.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                                     [migration.version, migration.name, migration.checksum])
                appliedNow.append(migration.version)
            }
            return appliedNow
        }
    }
}
