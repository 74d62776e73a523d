import Foundation

/// The fault suite's one deliberate break still inside a production executable
/// (`TALLY_DEBUG_BREAK=server-errors`, debug builds only; a release build ignores it): tally-ingest
/// answers 500 instead of 400 for an invalid event, so the suite can show its check catches it.
/// The consumers' breaks are decorators in `TallyTesting`, run by the test-only `tally-faults`.
enum InvariantBreak: String, Sendable {
    case serverErrors = "server-errors"

    private static let active: Set<InvariantBreak> = {
        #if DEBUG
        let names = (ProcessInfo.processInfo.environment["TALLY_DEBUG_BREAK"] ?? "").split(separator: ",")
        return Set(names.compactMap { InvariantBreak(rawValue: String($0)) })
        #else
        return []
        #endif
    }()

    var isOn: Bool { Self.active.contains(self) }
}
