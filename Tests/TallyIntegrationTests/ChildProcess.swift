import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A child process started with posix_spawn, its output in a log file.
///
/// Foundation's `Process.waitUntilExit` hangs when the child leaves a daemon
/// behind (PostgreSQL after `pg_ctl start`), so the tests spawn and reap directly.
final class ChildProcess: @unchecked Sendable {
    let pid: pid_t
    let logPath: String
    private var exitStatus: Int32?

    /// Starts `executable` with `arguments`; `environment` entries are added to this process's.
    init(_ executable: String, _ arguments: [String], environment: [String: String] = [:], log: String? = nil) throws {
        logPath = log ?? NSTemporaryDirectory() + "tally-test-\(UInt32.random(in: 0...UInt32.max)).log"
        var fileActions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fileActions)
        defer { posix_spawn_file_actions_destroy(&fileActions) }
        posix_spawn_file_actions_addopen(&fileActions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fileActions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&fileActions, 1, 2)
        var merged = ProcessInfo.processInfo.environment
        // The fixtures' events carry fixed dates months back, and the broker stamps records with
        // today: a horizon of a century keeps them counted. The horizon's own test sets 35 days.
        merged["TALLY_DEDUP_HORIZON_DAYS"] = merged["TALLY_DEDUP_HORIZON_DAYS"] ?? "36500"
        for (key, value) in environment { merged[key] = value }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &fileActions, nil, argv, envp)
        guard result == 0 else {
            throw NSError(domain: "ChildProcess", code: Int(result), userInfo: [NSLocalizedDescriptionKey: "spawn \(executable): \(String(cString: strerror(result)))"])
        }
        pid = child
    }

    deinit {
        if exitStatus == nil {
            kill(pid, SIGKILL)
            _ = wait()
        }
    }

    func signal(_ signal: Int32) { kill(pid, signal) }

    /// Waits for the exit and returns the exit code (128 + signal when killed).
    @discardableResult
    func wait() -> Int32 {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        exitStatus = code
        return code
    }

    /// Waits up to `timeout`; nil when still running.
    func wait(timeout: Duration) -> Int32? {
        let deadline = ContinuousClock.now + timeout
        // At least one look, so a zero timeout asks "has it ended?".
        repeat {
            if let exitStatus { return exitStatus }
            var status: Int32 = 0
            let reaped = waitpid(pid, &status, WNOHANG)
            if reaped == pid {
                exitStatus = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
                return exitStatus
            }
            if ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
        } while ContinuousClock.now < deadline
        return nil
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Runs a command to completion and returns its exit code and output.
    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
        let child = try ChildProcess(executable, arguments, environment: environment)
        let status = child.wait()
        let output = child.log
        try? FileManager.default.removeItem(atPath: child.logPath)
        return (status, output)
    }
}
