import Foundation

/// Work started on a thread of its own; `wait()` blocks until it ends and returns its result.
/// Used where a batch's writes overlap with work on the calling thread.
final class BackgroundJob<Value>: @unchecked Sendable {
    private var result: Result<Value, any Error>?
    private let done = DispatchSemaphore(value: 0)

    /// `job` runs exactly once, on the new thread; nothing else touches what it uses meanwhile.
    init(_ job: @escaping () throws -> Value) {
        nonisolated(unsafe) let job = job
        Thread {
            self.result = Result { try job() }
            self.done.signal()
        }.start()
    }

    /// Call once.
    func wait() -> Result<Value, any Error> {
        done.wait()
        return result!
    }
}
