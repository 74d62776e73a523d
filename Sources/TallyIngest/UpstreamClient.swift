import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// HTTP(S) calls to an LLM upstream whose response body arrives as a stream of chunks,
/// so a streamed completion reaches the caller as the upstream sends it.
///
/// One URLSession (libcurl underneath on Linux: TLS, keep-alive) for every call; its
/// delegate routes each task's head, chunks and end to that call.
final class UpstreamClient: NSObject, URLSessionDataDelegate, @unchecked Sendable {
    struct Head {
        let status: Int
        let headers: [(String, String)]
    }

    private final class Call {
        var head: CheckedContinuation<Head, Error>?
        let body: AsyncThrowingStream<[UInt8], Error>.Continuation
        init(head: CheckedContinuation<Head, Error>, body: AsyncThrowingStream<[UInt8], Error>.Continuation) {
            self.head = head
            self.body = body
        }
    }

    private let lock = NSLock()
    private var calls: [Int: Call] = [:]
    private var session: URLSession!

    /// `idleTimeout`: the longest wait for the response head or for the next chunk.
    init(idleTimeout: Duration) {
        super.init()
        let configuration = URLSessionConfiguration.ephemeral
        configuration.timeoutIntervalForRequest = idleTimeout.totalSeconds
        configuration.timeoutIntervalForResource = 24 * 3600
        configuration.httpMaximumConnectionsPerHost = 256
        configuration.requestCachePolicy = .reloadIgnoringLocalCacheData
        session = URLSession(configuration: configuration, delegate: self, delegateQueue: nil)
    }

    /// Sends the request; returns once the response head arrived, with the body to read.
    /// Ending the body stream early (the caller went away) cancels the upstream call.
    func send(_ request: URLRequest) async throws -> (Head, AsyncThrowingStream<[UInt8], Error>) {
        let (stream, body) = AsyncThrowingStream<[UInt8], Error>.makeStream()
        let task = session.dataTask(with: request)
        body.onTermination = { termination in
            if case .cancelled = termination { task.cancel() }
        }
        let head = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Head, Error>) in
            lock.withLock { calls[task.taskIdentifier] = Call(head: continuation, body: body) }
            task.resume()
        }
        return (head, stream)
    }

    private func call(_ task: URLSessionTask) -> Call? {
        lock.withLock { calls[task.taskIdentifier] }
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive response: URLResponse,
                    completionHandler: @escaping (URLSession.ResponseDisposition) -> Void) {
        if let call = call(dataTask), let http = response as? HTTPURLResponse {
            let headers = http.allHeaderFields.compactMap { name, value -> (String, String)? in
                guard let name = name as? String else { return nil }
                return (name, "\(value)")
            }
            call.head?.resume(returning: Head(status: http.statusCode, headers: headers))
            call.head = nil
        }
        completionHandler(.allow)
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive data: Data) {
        call(dataTask)?.body.yield([UInt8](data))
    }

    func urlSession(_ session: URLSession, task: URLSessionTask, didCompleteWithError error: Error?) {
        guard let call = lock.withLock({ calls.removeValue(forKey: task.taskIdentifier) }) else { return }
        if let head = call.head {
            head.resume(throwing: error ?? URLError(.badServerResponse))
            call.head = nil
        }
        if let error { call.body.finish(throwing: error) } else { call.body.finish() }
    }

    /// Whether an error is the upstream timing out (as opposed to failing).
    static func isTimeout(_ error: Error) -> Bool {
        (error as? URLError)?.code == .timedOut
    }
}
