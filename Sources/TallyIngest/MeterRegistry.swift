import Foundation
import Logging
import TallyCore
import TallyPipeline
import TallyPostgres

/// The meters the catalog in force declares (`tally meters apply`), so that `/v1/events` refuses
/// an event naming another meter, with the field and reason, as it refuses an unknown token field.
///
/// Read again at most every `cacheTTL`; libpq calls block, so they run on a queue of their own.
/// When the database cannot be read the last names read are used, and before any were read no
/// event is refused for its meters: the aggregator keeps readings of undeclared meters aside
/// (`tally.meter_undeclared_readings`) until they are declared, so nothing is lost either way.
final class MeterRegistry: @unchecked Sendable {
    private let queue = DispatchQueue(label: "tally.ingest.meters")
    private let connection: PostgresConnection
    private let logger: Logger
    private let cacheTTL: Duration
    /// Touched on `queue` only.
    private var declared: Set<String>?
    private var checkedAt: ContinuousClock.Instant?

    init(connection: PostgresConnection, logger: Logger, cacheTTL: Duration = .seconds(5)) {
        self.connection = connection
        self.logger = logger
        self.cacheTTL = cacheTTL
    }

    /// `outcomes` with each valid event that names an undeclared meter rejected, naming it.
    func refusingUndeclared(_ outcomes: [IngestOutcome]) async -> [IngestOutcome] {
        guard outcomes.contains(where: { if case .valid(let event, _) = $0 { !event.meters.isEmpty } else { false } }) else { return outcomes }
        guard let declared = await declaredMeters() else { return outcomes }
        return outcomes.map { outcome in
            guard case .valid(let event, _) = outcome else { return outcome }
            let unknown = event.meters.keys.filter { !declared.contains($0) }.sorted()
            guard !unknown.isEmpty else { return outcome }
            return .rejected(unknown.map { FieldViolation("data.meters." + $0, "is not a declared meter; declare it first (tally meters apply) or see tally meters list") })
        }
    }

    /// Why `meter` may not be named (it is not declared), or nil (declared, or the catalog is unreadable).
    func undeclared(_ meter: String) async -> String? {
        guard let declared = await declaredMeters(), !declared.contains(meter) else { return nil }
        return "\(meter) is not a declared meter; declare it first (tally meters apply) or see tally meters list"
    }

    private func declaredMeters() async -> Set<String>? {
        await withCheckedContinuation { continuation in
            queue.async { [self] in
                let now = ContinuousClock.now
                if let checkedAt, now - checkedAt < cacheTTL { return continuation.resume(returning: declared) }
                do {
                    let catalog = try connection.retrying(timeout: .seconds(2)) { connection in
                        try MeterCatalogStore(connection: connection).latest()?.catalog
                    }
                    declared = Set(catalog?.meters.keys ?? [:].keys)
                    checkedAt = now
                } catch {
                    logger.warning("the meter catalog could not be read (\(error)); using the last one read")
                }
                continuation.resume(returning: declared)
            }
        }
    }
}
