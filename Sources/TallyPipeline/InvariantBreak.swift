import Foundation

/// Deliberate bugs for the fault suite's self-test (`TALLY_DEBUG_BREAK=dedup,fencing,…`): each
/// breaks one invariant so the suite can show its check catches it. Debug builds only; a
/// release build ignores the variable.
public enum InvariantBreak: String, CaseIterable, Sendable {
    /// Events seen before are counted again (no dedup-key look-up or store).
    case dedup
    /// Offsets are written without the compare-and-set on offset and epoch.
    case fencing
    /// Every 50th usage event is skipped while its offset still moves.
    case drop
    /// Each aggregator batch counts one made-up event that was never published.
    case phantom
    /// Dead letters are not recorded in `tally.dead_letters`.
    case deadLetters = "dead-letters"
    /// The rater credits no grants.
    case wallet
    /// tally-ingest answers 500 instead of 400 for an invalid event.
    case serverErrors = "server-errors"

    private static let active: Set<InvariantBreak> = {
        #if DEBUG
        let names = (ProcessInfo.processInfo.environment["TALLY_DEBUG_BREAK"] ?? "").split(separator: ",")
        return Set(names.compactMap { InvariantBreak(rawValue: String($0)) })
        #else
        return []
        #endif
    }()

    public var isOn: Bool { Self.active.contains(self) }
}
