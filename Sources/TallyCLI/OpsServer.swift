import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// A minimal HTTP/1.1 endpoint for operations: `/livez`, `/readyz` and `/metrics`.
///
/// Consumers are blocking loops with no HTTP stack of their own; this serves
/// the three GETs a scraper or an orchestrator sends, one short connection at a
/// time, on a thread of its own. Every response closes the connection.
public final class OpsServer: @unchecked Sendable {
    public let port: Int
    private let socket: Int32
    private let logger: Logger
    private let ready: @Sendable () -> Bool
    private let metrics: @Sendable () -> String

    /// Binds `host:port` (port 0 picks a free one, see `port`) and starts serving.
    public init(host: String, port: Int, logger: Logger, ready: @escaping @Sendable () -> Bool,
                metrics: @escaping @Sendable () -> String) throws {
        self.logger = logger
        self.ready = ready
        self.metrics = metrics
        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw OpsServerError(reason: "socket: \(String(cString: strerror(errno)))") }
        var yes: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            close(fd)
            throw OpsServerError(reason: "\(host) is not an IPv4 address")
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw OpsServerError(reason: "bind \(host):\(port): \(reason)")
        }
        var actual = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        self.port = Int(UInt16(bigEndian: actual.sin_port))
        socket = fd
        let thread = Thread { [self] in serve() }
        thread.name = "tally.ops-http"
        thread.start()
    }

    private func serve() {
        while true {
            let client = accept(socket, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            // A stuck client must not block the next scrape for long.
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            respond(client)
            close(client)
        }
    }

    private func respond(_ client: Int32) {
        var request: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        // The whole request within 2 s: a client trickling a byte a second must not hold the port.
        let deadline = ContinuousClock.now + .seconds(2)
        while request.count < 16_384 && ContinuousClock.now < deadline {
            let count = read(client, &buffer, buffer.count)
            if count <= 0 { break }
            request.append(contentsOf: buffer[0..<count])
            if request.count >= 4, request.suffix(4) == [13, 10, 13, 10] { break }
        }
        let line = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self).split(separator: " ")
        let (status, type, body): (String, String, String)
        if line.count < 2 || line[0] != "GET" {
            (status, type, body) = ("405 Method Not Allowed", "text/plain", "only GET\n")
        } else {
            switch line[1].split(separator: "?").first.map(String.init) ?? "" {
            case "/livez": (status, type, body) = ("200 OK", "text/plain", "ok\n")
            case "/readyz":
                (status, type, body) = ready() ? ("200 OK", "text/plain", "ready\n") : ("503 Service Unavailable", "text/plain", "not ready\n")
            case "/metrics": (status, type, body) = ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics())
            default: (status, type, body) = ("404 Not Found", "text/plain", "not found\n")
            }
        }
        let payload = Array(body.utf8)
        let head = "HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(payload.count)\r\nConnection: close\r\n\r\n"
        let response = Array(head.utf8) + payload
        var sent = 0
        while sent < response.count {
            // MSG_NOSIGNAL: a peer that reset the connection is an error here, never a SIGPIPE.
            let count = response[sent...].withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if count <= 0 { break }
            sent += count
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
