import Foundation
import Hummingbird
import Logging
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The operations endpoint of a consumer: `GET /livez`, `/readyz` and `/metrics`, served by
/// Hummingbird on its own event loop beside the consumer's blocking loop.
///
/// A connection that sends no complete request for `idleTimeout` (a silent client, or one
/// trickling header bytes) is closed, at most `maxConnections` are open at once (more wait in
/// the listen backlog: the consumer's file descriptors are also librdkafka's and libpq's), and a
/// reset connection is an error for that connection only, so no client can hold the port or
/// stop the process (issue #21).
public final class OpsServer: Sendable {
    /// The bound port (the one the system picked when asked for port 0).
    public let port: Int
    private let task: Task<Void, Never>

    /// Binds `host:port` and starts serving; throws when the address cannot be bound.
    public init(host: String, port: Int, logger: Logger, idleTimeout: Duration = .seconds(5), maxConnections: Int = 32,
                ready: @escaping @Sendable () -> Bool, metrics: @escaping @Sendable () -> String) throws {
        let router = Router()
        router.get("livez") { _, _ in Self.text(.ok, "ok\n") }
        router.get("readyz") { _, _ in ready() ? Self.text(.ok, "ready\n") : Self.text(.serviceUnavailable, "not ready\n") }
        router.get("metrics") { _, _ in Self.text(.ok, metrics(), type: "text/plain; version=0.0.4; charset=utf-8") }
        let started = StartSignal()
        // Hummingbird's own lines (start, stop) are noise beside the consumer's: warnings only.
        var quiet = logger
        quiet.logLevel = .warning
        let app = Application(
            router: router,
            server: .http1(configuration: .init(idleTimeout: .init(idleTimeout))),
            configuration: .init(address: .hostname(host, port: port), serverName: "tally-ops",
                                 availableConnectionsDelegate: .maximum(maxConnections, logger: quiet)),
            onServerRunning: { channel in started.finish(.success(channel.localAddress?.port ?? port)) },
            logger: quiet)
        task = Task.detached {
            do {
                // The consumer handles SIGTERM itself; the endpoint ends with the process.
                try await app.runService(gracefulShutdownSignals: [])
            } catch {
                // Before it listened: the start fails with this. After: said, the consumer goes on.
                if !started.finish(.failure(OpsServerError(reason: "bind \(host):\(port): \(error)"))) {
                    logger.error("the ops endpoint stopped: \(error)")
                }
            }
        }
        switch started.wait(timeout: .seconds(30)) {
        case .success(let bound)?: self.port = bound
        case .failure(let error)?: throw error
        case nil:
            task.cancel()
            throw OpsServerError(reason: "\(host):\(port) did not start listening within 30 s")
        }
    }

    private static func text(_ status: HTTPResponse.Status, _ body: String, type: String = "text/plain") -> Response {
        Response(status: status, headers: [.contentType: type], body: .init(byteBuffer: ByteBuffer(string: body)))
    }
}

/// Hands the bound port (or why there is none) from the server's task to the starting thread.
private final class StartSignal: @unchecked Sendable {
    private let lock = NSLock()
    private let semaphore = DispatchSemaphore(value: 0)
    private var result: Result<Int, OpsServerError>?

    /// False when the start was already decided.
    @discardableResult
    func finish(_ outcome: Result<Int, OpsServerError>) -> Bool {
        let first = lock.withLock {
            guard result == nil else { return false }
            result = outcome
            return true
        }
        if first { semaphore.signal() }
        return first
    }

    func wait(timeout: Duration) -> Result<Int, OpsServerError>? {
        _ = semaphore.wait(timeout: .now() + .milliseconds(Int(timeout.components.seconds * 1000)))
        return lock.withLock { result }
    }
}

public struct OpsServerError: Error, CustomStringConvertible {
    public let reason: String
    public var description: String { "ops HTTP server: \(reason)" }
}

/// Process-wide settings every Tally executable applies first.
public enum ProcessSetup {
    /// A write to a connection the peer reset raises SIGPIPE, which kills the process by default:
    /// one port scan or health check could stop billing. Ignored, the write fails with EPIPE.
    public static func ignoreBrokenPipes() {
        signal(SIGPIPE, SIG_IGN)
    }
}
