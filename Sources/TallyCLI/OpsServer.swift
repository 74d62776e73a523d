import Foundation
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
#if canImport(Glibc)
import Glibc
#endif

/// The operations endpoint of a consumer: `GET /livez`, `/readyz` and `/metrics`, a Hummingbird
/// application run as a service of the consumer's service group.
///
/// A connection that sends no complete request for `idleTimeout` (a silent client, or one
/// trickling header bytes) is closed, at most `maxConnections` are open at once (more wait in
/// the listen backlog: the consumer's file descriptors are also librdkafka's and libpq's), and a
/// reset connection is an error for that connection only, so no client can hold the port or
/// stop the process (issue #21). An address that cannot be bound ends the process before the
/// consumer claims a partition (`started` says so); an endpoint that fails once it served is
/// logged and the consumer goes on without it.
struct OpsEndpoint: Service, CustomStringConvertible {
    private let application: any Service
    private let address: String
    private let logger: Logger
    /// Opened once the endpoint listens; failed when it could not.
    let started = StartGate()
    var description: String { "ops endpoint" }

    init(host: String, port: Int, logger: Logger, idleTimeout: Duration = .seconds(5), maxConnections: Int = 32,
         ready: @escaping @Sendable () -> Bool, metrics: @escaping @Sendable () -> String) {
        let router = Router()
        router.get("livez") { _, _ in Self.text(.ok, "ok\n") }
        router.get("readyz") { _, _ in ready() ? Self.text(.ok, "ready\n") : Self.text(.serviceUnavailable, "not ready\n") }
        router.get("metrics") { _, _ in Self.text(.ok, metrics(), type: "text/plain; version=0.0.4; charset=utf-8") }
        // Hummingbird's own lines (start, stop) are noise beside the consumer's: warnings only.
        var quiet = logger
        quiet.logLevel = .warning
        let started = self.started
        application = Application(
            router: router,
            server: .http1(configuration: .init(idleTimeout: .init(idleTimeout))),
            configuration: .init(address: .hostname(host, port: port), serverName: "tally-ops",
                                 availableConnectionsDelegate: .maximum(maxConnections, logger: quiet)),
            onServerRunning: { channel in
                logger.info("ops endpoint on http://\(host):\(channel.localAddress?.port ?? port) (/livez /readyz /metrics)")
                started.open(true)
            },
            logger: quiet)
        address = "\(host):\(port)"
        self.logger = logger
    }

    func run() async throws {
        do {
            try await application.run()
        } catch {
            if started.open(false) { throw OpsServerError(reason: "bind \(address): \(error)") }
            logger.error("the ops endpoint stopped: \(error); the consumer goes on without it")
        }
        // Shut down before it listened: the consumer has nothing to wait for.
        started.open(false)
    }

    private static func text(_ status: HTTPResponse.Status, _ body: String, type: String = "text/plain") -> Response {
        Response(status: status, headers: [.contentType: type], body: .init(byteBuffer: ByteBuffer(string: body)))
    }
}

/// Whether a service started: decided once, by the service's task; waited for on a thread.
final class StartGate: @unchecked Sendable {
    private let condition = NSCondition()
    private var outcome: Bool?

    /// Decides the gate; false (and no change) when it was decided already.
    @discardableResult
    func open(_ started: Bool) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard outcome == nil else { return false }
        outcome = started
        condition.broadcast()
        return true
    }

    /// Blocks until the gate is decided; true when the service started.
    func wait() -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let outcome { return outcome }
            condition.wait()
        }
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
