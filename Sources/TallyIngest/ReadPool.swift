import Foundation
import Logging
import TallyPostgres

/// A few PostgreSQL connections for the read API and the console. libpq blocks, so each
/// connection is used on a serial queue of its own, never on the event loop; requests take the
/// lanes in turn.
final class ReadPool: @unchecked Sendable {
    private struct Lane {
        let queue: DispatchQueue
        let connection: PostgresConnection
    }

    private let lanes: [Lane]
    private let lock = NSLock()
    /// Touched under `lock`.
    private var next = 0

    /// Room to aggregate a large customer's month in memory, and a bound on any one read.
    static let settings = [(name: "work_mem", value: "32MB"), (name: "statement_timeout", value: "15s")]

    /// - Parameter count: connections to open (1 or more).
    init(url: String, count: Int, logger: Logger) throws {
        lanes = try (0..<max(1, count)).map { index in
            Lane(queue: DispatchQueue(label: "tally.ingest.read.\(index)"),
                 connection: try PostgresConnection(url: url, logger: logger, searchPath: "tally", settings: Self.settings))
        }
    }

    /// Runs `body` with a connection; with `retrying`, again on a new connection (for up to two
    /// seconds) if it was lost. Writes pass false: a lost reply may hide a commit.
    func run<T: Sendable>(retrying: Bool = true, _ body: @escaping @Sendable (PostgresConnection) throws -> T) async throws -> T {
        let lane = lock.withLock {
            next = (next + 1) % lanes.count
            return lanes[next]
        }
        return try await withCheckedThrowingContinuation { continuation in
            lane.queue.async {
                continuation.resume(with: Result {
                    retrying ? try lane.connection.retrying(timeout: .seconds(2)) { try body($0) } : try body(lane.connection)
                })
            }
        }
    }
}
