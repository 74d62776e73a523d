import Foundation
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
#if canImport(Glibc)
import Glibc
#endif

/// The operations endpoint of a consumer: `GET /livez`, `/readyz` and `/metrics`, a Hummingbird
/// application run as a `Service` in the consumer's service group.
///
/// A connection that sends no complete request for `idleTimeout` (a silent client, or one
/// trickling header bytes) is closed, at most `maxConnections` are open at once (more wait in
/// the listen backlog: the consumer's file descriptors are also librdkafka's and libpq's), and a
/// reset connection is an error for that connection only, so no client can hold the port or
/// stop the process (issue #21). An address that cannot be bound ends the group with that error.
public enum OpsEndpoint {
    /// The endpoint on `host:port`; once bound it logs "ops endpoint on http://host:port …"
    /// (the port the system picked when asked for port 0).
    public static func service(host: String, port: Int, logger: Logger, idleTimeout: Duration = .seconds(5), maxConnections: Int = 32,
                               ready: @escaping @Sendable () -> Bool, metrics: @escaping @Sendable () -> String) -> some Service {
        let router = Router()
        router.get("livez") { _, _ in text(.ok, "ok\n") }
        router.get("readyz") { _, _ in ready() ? text(.ok, "ready\n") : text(.serviceUnavailable, "not ready\n") }
        router.get("metrics") { _, _ in text(.ok, metrics(), type: "text/plain; version=0.0.4; charset=utf-8") }
        // Hummingbird's own lines (start, stop) are noise beside the consumer's: warnings only.
        var quiet = logger
        quiet.logLevel = .warning
        return Application(
            router: router,
            server: .http1(configuration: .init(idleTimeout: .init(idleTimeout))),
            configuration: .init(address: .hostname(host, port: port), serverName: "tally-ops",
                                 availableConnectionsDelegate: .maximum(maxConnections, logger: quiet)),
            onServerRunning: { channel in
                logger.info("ops endpoint on http://\(host):\(channel.localAddress?.port ?? port) (/livez /readyz /metrics)")
            },
            logger: quiet)
    }

    private static func text(_ status: HTTPResponse.Status, _ body: String, type: String = "text/plain") -> Response {
        Response(status: status, headers: [.contentType: type], body: .init(byteBuffer: ByteBuffer(string: body)))
    }
}

/// Process-wide settings every Tally executable applies first.
public enum ProcessSetup {
    /// A write to a connection the peer reset raises SIGPIPE, which kills the process by default:
    /// one port scan or health check could stop billing. Ignored, the write fails with EPIPE.
    public static func ignoreBrokenPipes() {
        signal(SIGPIPE, SIG_IGN)
    }
}
