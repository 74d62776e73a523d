import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import TallyPipeline

/// Runs blocking work (libpq and librdkafka calls) on a thread of its own and returns its result,
/// so that it never holds one of the cooperative pool's threads (two on a 2-core machine).
public func onDedicatedThread<T: Sendable>(named name: String, _ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread { continuation.resume(with: Result { try body() }) }
        thread.name = name
        thread.start()
    }
}

/// A long-lived blocking part of a process (the consumer loop, the alert relay) as a `Service`:
/// `body` runs on a dedicated thread until it returns; the group's graceful shutdown (SIGTERM,
/// SIGINT, or another service's end) or a cancellation sets `stop`, which `body` polls to finish
/// what it has in hand. The group shuts services down in reverse order of registration.
struct ThreadService: Service, CustomStringConvertible {
    /// The thread's name, also the service's in the group's log lines.
    let description: String
    let stop: SharedFlag
    var onStop: @Sendable () -> Void = {}
    let body: @Sendable () throws -> Void

    func run() async throws {
        try await withTaskCancellationOrGracefulShutdownHandler {
            try await onDedicatedThread(named: description, body)
        } onCancelOrGracefulShutdown: { [stop, onStop] in
            onStop()
            stop.set()
        }
    }
}

/// Runs an async command as the executable's entry point. Called where only
/// `AsyncParsableCommand` is known, `main()` is the async one (a plain `Command.main()` in a
/// `main.swift` resolves to the synchronous entry point, which refuses an async command).
public func runAsync<Command: AsyncParsableCommand>(_ command: Command.Type) async { await command.main() }
