import Logging
import TallyCore
import TallyPostgres

/// This instance's hold on a partition: the epoch it claimed and where it stands.
public struct PartitionClaim: Sendable, Equatable {
    public var epoch: Int64
    public var nextOffset: Int64
    /// The partition's log clock at `nextOffset` (see `DedupHorizon`); nil before any timestamp.
    public var logClock: Int64?
    /// Where the topic's partition stood when the horizon was introduced (`tally.dedup_horizon_start`):
    /// records below it were counted without one and are not judged.
    public var horizonFromOffset: Int64

    public init(epoch: Int64, nextOffset: Int64, logClock: Int64? = nil, horizonFromOffset: Int64 = 0) {
        self.epoch = epoch
        self.nextOffset = nextOffset
        self.logClock = logClock
        self.horizonFromOffset = horizonFromOffset
    }
}

/// A poison record on its way to the dead-letter table.
public struct DeadLetter: Sendable {
    public let position: LogPosition
    public let reason: PoisonReason
    public let key: [UInt8]?
    public let value: [UInt8]?
}

/// Everything one batch changes, per partition: the events and dead letters it
/// holds and the offset the partition moves to.
public struct PreparedBatch: Sendable {
    public var events: [PositionedEvent] = []
    public var deadLetters: [DeadLetter] = []
    /// Wallet grants: the rater credits them; the aggregator only moves past them.
    public var grants: [PositionedGrant] = []
    /// Grant voids: the rater writes off what is left of the grant; the aggregator moves past them.
    public var voids: [PositionedGrantVoid] = []
    /// Budget declarations: the rater counts usage against them; the aggregator moves past them.
    public var budgets: [PositionedBudget] = []
    /// Usage events sent again by `tally pricing rate-unpriced` (header `tally-rate-unpriced`): the
    /// rater rates those still kept unpriced once a price exists; to every other rule they are
    /// ordinary duplicates.
    public var rateUnpricedAt: Set<LogPosition> = []
    /// Producer timestamps (ms) of the batch's oldest and newest records: when tally-ingest wrote them.
    public var recordTimes: (oldest: Int64, newest: Int64)?
    /// partition → (expected current next_offset, new next_offset, claimed epoch)
    public var moves: [Int32: (expected: Int64, next: Int64, epoch: Int64)] = [:]
    /// partition → its log clock after the batch, where the batch read a timestamp or the
    /// partition had one (see `DedupHorizon`); stored with the offset.
    public var logClocks: [Int32: Int64] = [:]

    public init() {}

    /// The same batch without the given partitions.
    public func removing(_ partitions: Set<Int32>) -> PreparedBatch {
        guard !partitions.isEmpty else { return self }
        var copy = self
        copy.events.removeAll { partitions.contains($0.position.partition) }
        copy.deadLetters.removeAll { partitions.contains($0.position.partition) }
        copy.grants.removeAll { partitions.contains($0.position.partition) }
        copy.voids.removeAll { partitions.contains($0.position.partition) }
        copy.budgets.removeAll { partitions.contains($0.position.partition) }
        copy.rateUnpricedAt = copy.rateUnpricedAt.filter { !partitions.contains($0.partition) }
        for partition in partitions {
            copy.moves.removeValue(forKey: partition)
            copy.logClocks.removeValue(forKey: partition)
        }
        return copy
    }
}

/// How a commit ended.
public enum CommitOutcome: Sendable, Equatable {
    case committed(DedupSummary)
    /// Another instance claimed these partitions since we did: nothing was written.
    case fenced(Set<Int32>)
    /// Our own epoch, but the stored offset moved (an earlier COMMIT whose reply was lost
    /// succeeded after all): nothing was written; resume from the stored positions.
    case resync([Int32: PartitionClaim])
}

public struct DedupSummary: Sendable, Equatable {
    public var accepted = 0
    public var duplicates = 0
    /// The events whose id was seen before with another payload (each logged by the loop).
    public var conflicts: [EventConflict] = []
    public var deadLetters = 0
    /// Rater only: grants credited and usage events no price book prices.
    public var grants = 0
    public var unpriced = 0
    /// Rater only: records kept aside in `tally.unrateable_records`, one line each (logged by the loop).
    public var unrateable: [String] = []

    public init(accepted: Int = 0, duplicates: Int = 0, conflicts: [EventConflict] = [], deadLetters: Int = 0,
                grants: Int = 0, unpriced: Int = 0, unrateable: [String] = []) {
        self.accepted = accepted
        self.duplicates = duplicates
        self.conflicts = conflicts
        self.deadLetters = deadLetters
        self.grants = grants
        self.unpriced = unpriced
        self.unrateable = unrateable
    }
}

/// A consumer's state in PostgreSQL: what a batch changes, committed with its offsets.
public protocol ConsumerStore: AnyObject, Sendable {
    /// Takes ownership of partitions by bumping their epoch; returns where each resumes.
    func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim]
    /// Applies a batch and moves its offsets in one transaction (fenced).
    func commit(_ batch: PreparedBatch) throws -> CommitOutcome
    /// Deferred upkeep, done while the loop is idle (no batch in flight, a poll found nothing).
    func idleUpkeep() throws
    /// Records that `partition`'s log ends at `logEnd`, below the offset this group stored
    /// (`tally.log_gaps`); the first record of a gap is kept. Called with no batch in flight.
    func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws
    /// The recorded gaps of these partitions (end first seen, by partition): a claim must not
    /// read them again until an operator chose (`tally check-log --keep`, `tally replay --promote`).
    func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64]
}

extension ConsumerStore {
    public func idleUpkeep() throws {}
}

/// What every consumer store shares: fenced offsets, dedup-key lookups, conflicts and dead letters.
///
/// Table names are unqualified and resolve through the connection's search path
/// (`tally`, or a replay's shadow schema).
public final class ConsumerTables: @unchecked Sendable {
    public let connection: PostgresConnection
    public let group: String
    public let topic: String
    public let instanceID: String
    /// Keys known to be stored: a batch looks up only what the cache lacks, and only when the
    /// cache has lately missed one (see `storedHashes`).
    private var keyCache = DedupKeyCache()
    /// The `state_version`s the cache was filled under: a promoted replay replaces the keys.
    private var keyCacheVersions: [Int32: Int64] = [:]
    /// Keys the transaction in progress stores; cached once it commits.
    private var keysInFlight: [(key: DedupKeyCache.Fingerprint, contentHash: UInt64)] = []
    /// Set while the cache may lack stored keys (at start, after a claim, after it missed one);
    /// cleared by a look-up that finds nothing the cache lacked.
    private var lookUpStoredKeys = true
    /// Per keys table: whether keys without sources (`DedupKey.anySource`) remain; nil until asked.
    private var keysOfAnySource: [String: Bool] = [:]
    private let logger = Logger(label: "tally.consumer-store")

    public init(connection: PostgresConnection, group: String, topic: String, instanceID: String) {
        self.connection = connection
        self.group = group
        self.topic = topic
        self.instanceID = instanceID
    }

    /// A key the cache lacked is stored already (its unique constraint said so); the
    /// transaction is rolled back and the batch applied again with a look-up.
    struct StoredKeyMissedByCache: Error {}

    /// From this commit on, an instance that claimed earlier cannot commit these partitions.
    /// - Parameter alsoInTransaction: more the store records in the claim's transaction, which
    ///   fences the partitions' previous owner (the rater's credit signing horizon).
    public func claim(_ partitions: [Int32],
                      alsoInTransaction: (PostgresConnection, [Int32: PartitionClaim]) throws -> Void = { _, _ in }) throws -> [Int32: PartitionClaim] {
        guard !partitions.isEmpty else { return [:] }
        // Their previous owner stored keys this cache never saw (and a promoted replay may have
        // replaced keys without sources).
        lookUpStoredKeys = true
        keysOfAnySource.removeAll()
        return try connection.transaction { connection in
            // The horizon's start is the topic's (schema tally, a replay's too): every group decides alike.
            let result = try connection.query("""
                WITH claimed AS (
                    INSERT INTO consumer_offsets AS o (consumer_group, topic, partition, next_offset, owner_epoch, owner_instance)
                    SELECT $1, $2, p, 0, 1, $3 FROM unnest($4::int[]) AS p
                    ON CONFLICT (consumer_group, topic, partition)
                    DO UPDATE SET owner_epoch = o.owner_epoch + 1, owner_instance = EXCLUDED.owner_instance
                    RETURNING partition, next_offset, owner_epoch, log_clock_ms)
                SELECT c.partition, c.next_offset, c.owner_epoch, c.log_clock_ms, coalesce(s.from_offset, 0)
                FROM claimed c LEFT JOIN tally.dedup_horizon_start s ON s.topic = $2 AND s.partition = c.partition
                """, [group, topic, instanceID, PostgresArray(partitions.sorted())])
            var claims: [Int32: PartitionClaim] = [:]
            for row in 0..<result.rowCount {
                claims[Int32(try result.value(row, 0, as: Int64.self))] = PartitionClaim(
                    epoch: try result.value(row, 2, as: Int64.self), nextOffset: try result.value(row, 1, as: Int64.self),
                    logClock: try result.int64(row, 3), horizonFromOffset: try result.value(row, 4, as: Int64.self))
            }
            try alsoInTransaction(connection, claims)
            return claims
        }
    }

    /// Runs `apply` in one transaction after moving the batch's offsets; see the numbered
    /// steps here and in `apply` for what a crash at each point means.
    /// `apply` gets each moved partition's `state_version` (see migration 0006).
    /// `discardAttempt` runs before a rolled-back attempt is applied again: a store that changed
    /// its own state while the keys went in drops that change there.
    public func commit(_ batch: PreparedBatch, discardAttempt: () -> Void = {},
                       apply: (PostgresConnection, [Int32: Int64]) throws -> DedupSummary) throws -> CommitOutcome {
        var attempts = 0
        while true {
            keysInFlight.removeAll(keepingCapacity: true)
            do {
                let outcome = try commitOnce(batch, apply: apply)
                if case .committed = outcome {
                    for stored in keysInFlight { keyCache.insert(stored.key, contentHash: stored.contentHash) }
                }
                return outcome
            } catch is StoredKeyMissedByCache where attempts < 4 {
                // Each retry looks up every key; a concurrent writer of the same key makes its
                // COPY wait and fail, and the next look-up sees that key committed.
                attempts += 1
                lookUpStoredKeys = true
                discardAttempt()
                logger.info("a stored dedup key was missing from the key cache (another instance or lane wrote it): applying the batch again with a look-up")
            }
        }
    }

    private func commitOnce(_ batch: PreparedBatch, apply: (PostgresConnection, [Int32: Int64]) throws -> DedupSummary) throws -> CommitOutcome {
        struct MoveFailed: Error { let partitions: Set<Int32> }
        do {
            return try connection.transaction { connection -> CommitOutcome in
                // 1. Move the offsets, compare-and-set on (offset, epoch). This locks the offset
                //    rows first, so a concurrent zombie commit waits here and then fails its CAS.
                //    Crash from here to COMMIT: the server rolls everything back; the batch is
                //    re-read from the old offsets.
                let partitions = batch.moves.keys.sorted()
                //    The log clock moves with the offset (GREATEST ignores the NULL of a batch
                //    that read no timestamp).
                let moved = try connection.query("""
                    UPDATE consumer_offsets AS o SET next_offset = m.next, committed_at = now(), log_clock_ms = GREATEST(o.log_clock_ms, m.clock)
                    FROM unnest($3::int[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[]) AS m(partition, expected, next, epoch, clock)
                    WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = m.partition
                      AND o.next_offset = m.expected AND o.owner_epoch = m.epoch
                    RETURNING o.partition, o.state_version
                    """, [group, topic, PostgresArray(partitions), PostgresArray(partitions.map { batch.moves[$0]!.expected }),
                          PostgresArray(partitions.map { batch.moves[$0]!.next }), PostgresArray(partitions.map { batch.moves[$0]!.epoch }),
                          PostgresArray(partitions.map { batch.logClocks[$0].map(String.init) })])
                var movedPartitions = Set<Int32>()
                var stateVersions: [Int32: Int64] = [:]
                for row in 0..<moved.rowCount {
                    let partition = Int32(try moved.value(row, 0, as: Int64.self))
                    movedPartitions.insert(partition)
                    stateVersions[partition] = try moved.value(row, 1, as: Int64.self)
                }
                let missing = Set(partitions).subtracting(movedPartitions)
                // Throwing rolls the transaction back before anything else was written.
                if !missing.isEmpty { throw MoveFailed(partitions: missing) }
                // A promoted replay replaced the keys: start over, looking them up.
                if stateVersions.contains(where: { partition, version in keyCacheVersions[partition].map { $0 != version } ?? false }) {
                    keyCache.removeAll()
                    lookUpStoredKeys = true
                }
                keyCacheVersions.merge(stateVersions) { $1 }
                // 2.–5. The consumer's own writes.
                let summary = try apply(connection, stateVersions)
                // 6. COMMIT (by transaction()). A crash before the reply leaves the outcome
                //    unknown to us; the next commit's CAS tells (see `.resync`).
                return .committed(summary)
            }
        } catch let failure as MoveFailed {
            return try diagnoseFailedMove(failure.partitions, batch: batch)
        }
    }

    private func diagnoseFailedMove(_ partitions: Set<Int32>, batch: PreparedBatch) throws -> CommitOutcome {
        let result = try connection.query("""
            SELECT partition, next_offset, owner_epoch, log_clock_ms FROM consumer_offsets
            WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])
            """, [group, topic, PostgresArray(partitions.sorted())])
        var fenced = Set(partitions)
        var resync: [Int32: PartitionClaim] = [:]
        for row in 0..<result.rowCount {
            let partition = Int32(try result.value(row, 0, as: Int64.self))
            let epoch = try result.value(row, 2, as: Int64.self)
            if epoch == batch.moves[partition]?.epoch {
                resync[partition] = PartitionClaim(epoch: epoch, nextOffset: try result.value(row, 1, as: Int64.self),
                                                   logClock: try result.int64(row, 3))
                fenced.remove(partition)
            }
        }
        if !fenced.isEmpty { return .fenced(fenced) }
        return .resync(resync)
    }

    /// Fingerprints of the keys already stored in `table` (customer_id, event_id, content_hash).
    ///
    /// Usually from the cache alone: a key it lacks is taken as new, and `storeKeys` fails the
    /// transaction if it was not. After such a miss, keys are looked up in PostgreSQL until a
    /// look-up finds nothing the cache lacked.
    public func storedHashes<Candidate: DedupCandidate>(of candidates: [Candidate], table: String) throws -> [DedupKey: UInt64] {
        guard !candidates.isEmpty else { return [:] }
        var stored: [DedupKey: UInt64] = [:]
        guard lookUpStoredKeys else {
            for candidate in candidates {
                if let hash = keyCache[candidate.keyFingerprint] { stored[candidate.key] = hash }
            }
            return stored
        }
        let keys = Deduplicator.keys(of: candidates)
        // A key stored before identities had sources (`DedupKey.anySource`) answers for its id
        // from every source; an exact key wins over it.
        let result = try connection.query("""
            SELECT DISTINCT ON (u.i) u.i, k.content_hash FROM \(SQLIdentifier(table)) k
            JOIN unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(customer_id, event_source, event_id, i)
              ON k.customer_id = u.customer_id AND k.event_id = u.event_id AND k.event_source IN (u.event_source, $4)
            ORDER BY u.i, k.event_source = $4
            """, [PostgresArray(keys.map(\.customerID)), PostgresArray(keys.map(\.source)), PostgresArray(keys.map(\.eventID)),
                  DedupKey.anySource])
        var cacheLacked = false
        for row in 0..<result.rowCount {
            let key = keys[Int(try result.value(row, 0, as: Int64.self)) - 1]
            let hash = UInt64(bitPattern: try result.value(row, 1, as: Int64.self))
            stored[key] = hash
            if keyCache[key] == nil { cacheLacked = true }
            // Committed already, so true whatever happens to this transaction.
            keyCache.insert(key, contentHash: hash)
        }
        // While keys without sources remain, the cache cannot answer for them: a key it lacks may
        // be one of those under another source, which no unique constraint would catch.
        if try !cacheLacked && !hasKeysOfAnySource(table) { lookUpStoredKeys = false }
        return stored
    }

    /// Whether `table` still holds keys stored before identities had sources; asked once per claim.
    private func hasKeysOfAnySource(_ table: String) throws -> Bool {
        if let known = keysOfAnySource[table] { return known }
        let found = try connection.query("SELECT EXISTS (SELECT 1 FROM \(SQLIdentifier(table)) WHERE event_source = $1)", [DedupKey.anySource]).rows[0][0] == "t"
        keysOfAnySource[table] = found
        return found
    }

    /// Stores the keys of newly counted events (COPY: they are new unless the cache missed one,
    /// which the primary key turns into `StoredKeyMissedByCache`).
    public func storeKeys<Candidate: DedupCandidate>(_ accepted: [Candidate], table: String) throws {
        guard !accepted.isEmpty else { return }
        do {
            try connection.copyIn("COPY \(SQLIdentifier(table)) (customer_id, event_id, event_source, content_hash, partition, record_offset) FROM STDIN WITH (FORMAT binary)",
                                  format: .binary, rows: accepted.keyOrder()) { index, fields in
                let key = accepted[index].key
                fields.add(key.customerID)
                fields.add(key.eventID)
                fields.add(key.source)
                fields.add(ContentHash.signed(accepted[index].contentHash))
                fields.add(accepted[index].position.partition)
                fields.add(accepted[index].position.offset)
            }
        } catch {
            if error.sqlState == "23505" { throw StoredKeyMissedByCache() }
            throw error
        }
        // Listed here, on the COPY's thread when it has one, not after COMMIT.
        keysInFlight.reserveCapacity(keysInFlight.count + accepted.count)
        for index in accepted.indices { keysInFlight.append((accepted[index].keyFingerprint, accepted[index].contentHash)) }
    }

    /// Stores keys (as `storeKeys`) on another thread while `meanwhile` works out the rest of the
    /// batch here, so the server inserts keys while we compute. `meanwhile` must not use the
    /// connection; both have finished when this returns or throws.
    public func storeKeys<Candidate: DedupCandidate, Value>(_ accepted: [Candidate], table: String,
                                                            meanwhile: () throws -> Value) throws -> Value {
        let copy = BackgroundJob { try self.storeKeys(accepted, table: table) }
        let value: Value
        do {
            value = try meanwhile()
        } catch {
            _ = copy.wait()
            throw error
        }
        try copy.wait().get()
        return value
    }

    /// Conflicts, idempotent by position.
    public func insertConflicts(_ conflicts: [EventConflict]) throws {
        guard !conflicts.isEmpty else { return }
        try connection.query("""
            INSERT INTO event_conflicts (consumer_group, customer_id, event_id, first_hash, conflicting_hash, topic, partition, record_offset, event_source)
            SELECT $1, c, e, f, h, $2, p, o, s FROM unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::int[], $8::bigint[], $9::text[])
                AS x(c, e, f, h, p, o, s)
            ON CONFLICT DO NOTHING
            """, [group, topic, PostgresArray(conflicts.map(\.key.customerID)), PostgresArray(conflicts.map(\.key.eventID)),
                  PostgresArray(conflicts.map { ContentHash.signed($0.firstHash) }),
                  PostgresArray(conflicts.map { ContentHash.signed($0.conflictingHash) }),
                  PostgresArray(conflicts.map(\.position.partition)), PostgresArray(conflicts.map(\.position.offset)),
                  PostgresArray(conflicts.map(\.key.source))])
    }

    /// See `ConsumerStore.recordLogGap`.
    public func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        try connection.query("""
            INSERT INTO tally.log_gaps (consumer_group, topic, partition, stored_offset, log_end) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (consumer_group, topic, partition) DO NOTHING
            """, [group, topic, partition, storedOffset, logEnd])
    }

    /// See `ConsumerStore.recordedLogGaps`.
    public func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] {
        let rows = try connection.query("""
            SELECT partition, log_end FROM tally.log_gaps WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])
            """, [group, topic, PostgresArray(partitions)])
        var gaps: [Int32: Int64] = [:]
        for row in 0..<rows.rowCount { gaps[try rows.value(row, 0, as: Int32.self)] = try rows.value(row, 1, as: Int64.self) }
        return gaps
    }

    /// Dead letters, idempotent by position.
    public func insertDeadLetters(_ letters: [DeadLetter]) throws {
        guard !letters.isEmpty else { return }
        // The value is kept up to 64 KiB; record_size says how large it was.
        try connection.query("""
            INSERT INTO dead_letters (consumer_group, topic, partition, record_offset, reason_code, reason, record_key, record_value, record_size)
            SELECT $1, $2, p, o, c, r, k, v, s FROM unnest($3::int[], $4::bigint[], $5::text[], $6::text[], $7::bytea[], $8::bytea[], $9::int[])
                AS x(p, o, c, r, k, v, s)
            ON CONFLICT DO NOTHING
            """, [group, topic,
                  PostgresArray(letters.map(\.position.partition)), PostgresArray(letters.map(\.position.offset)),
                  PostgresArray(letters.map(\.reason.code)), PostgresArray(letters.map { sanitized($0.reason.detail) }),
                  PostgresArray(letters.map { $0.key.map { PostgresBytes($0).postgresText } }),
                  PostgresArray(letters.map { $0.value.map { PostgresBytes(Array($0.prefix(EventLimits.maxEventBytes))).postgresText } }),
                  PostgresArray(letters.map { Int32($0.value?.count ?? 0) })])
    }
}

/// PostgreSQL text cannot hold NUL; error details may quote one from a bad record.
func sanitized(_ text: String) -> String {
    String(String.UnicodeScalarView(text.prefix(2000).unicodeScalars.map { $0 == "\0" ? "\u{FFFD}" : $0 }))
}
