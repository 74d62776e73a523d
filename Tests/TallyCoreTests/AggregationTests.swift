@testable import TallyCore
import XCTest

final class AggregationTests: XCTestCase {
    func event(_ id: String, customer: String = "c", micros: Int64 = 0, input: Int64 = 10, output: Int64 = 5, model: String = "m") -> UsageEvent {
        UsageEvent(id: id, source: "s", subject: customer, time: EventTime(microseconds: micros), model: model,
                   inputTokens: input, outputTokens: output)
    }

    func testWindowsAreUTCHoursDaysAndCalendarMonths() {
        let t = EventTime("2024-02-29T23:59:59.999999Z")!.microseconds
        XCTAssertEqual(EventTime.format(microseconds: Granularity.hour.windowStart(t)), "2024-02-29T23:00:00Z")
        XCTAssertEqual(EventTime.format(microseconds: Granularity.day.windowStart(t)), "2024-02-29T00:00:00Z")
        XCTAssertEqual(EventTime.format(microseconds: Granularity.month.windowStart(t)), "2024-02-01T00:00:00Z")
        let offset = EventTime("2024-03-01T00:30:00+01:00")!.microseconds
        XCTAssertEqual(EventTime.format(microseconds: Granularity.month.windowStart(offset)), "2024-02-01T00:00:00Z", "by UTC, not local time")
        XCTAssertEqual(EventTime.format(microseconds: Granularity.hour.windowStart(-1)), "1969-12-31T23:00:00Z")
    }

    func testFirstByOffsetCountsDuplicatesAndConflictsDoNot() {
        let original = event("e1", input: 10)
        let changed = event("e1", input: 11)
        let batch = [
            PositionedEvent(event: changed, position: LogPosition(partition: 0, offset: 7)),
            PositionedEvent(event: original, position: LogPosition(partition: 0, offset: 3)),
            PositionedEvent(event: original, position: LogPosition(partition: 0, offset: 9)),
            PositionedEvent(event: event("e2"), position: LogPosition(partition: 0, offset: 10)),
        ]
        let decision = Deduplicator.decide(batch, stored: [:])
        XCTAssertEqual(decision.accepted.map(\.position.offset), [3, 10])
        XCTAssertEqual(decision.duplicates, 1)
        XCTAssertEqual(decision.conflicts.map(\.position.offset), [7])
        XCTAssertEqual(decision.conflicts.first?.firstHash, batch[1].contentHash)

        // Against stored keys: e1 was counted in an earlier batch.
        let later = Deduplicator.decide(batch, stored: [batch[1].key: batch[1].contentHash])
        XCTAssertEqual(later.accepted.map(\.position.offset), [10])
        XCTAssertEqual(later.duplicates, 2)
        XCTAssertEqual(later.conflicts.count, 1)
        XCTAssertEqual(Deduplicator.keys(of: batch).sorted(), [DedupKey(customerID: "c", source: "s", eventID: "e1"), DedupKey(customerID: "c", source: "s", eventID: "e2")])
    }

    /// CloudEvents 1.0: source + id is an event's identity. Id 1 from app://chat (100 tokens) and
    /// id 1 from app://search (200 tokens) are two events: 300 tokens, no conflict.
    func testTheSameIdFromTwoSourcesIsTwoEvents() {
        var chat = event("1", input: 100)
        chat.source = "app://chat"
        var search = event("1", input: 200)
        search.source = "app://search"
        let batch = [PositionedEvent(event: chat, position: LogPosition(partition: 0, offset: 0)),
                     PositionedEvent(event: search, position: LogPosition(partition: 0, offset: 1)),
                     PositionedEvent(event: search, position: LogPosition(partition: 0, offset: 2))]
        let decision = Deduplicator.decide(batch, stored: [:])
        XCTAssertEqual(decision.accepted.map(\.event.inputTokens).reduce(0, +), 300)
        XCTAssertEqual(decision.duplicates, 1, "the resent search event")
        XCTAssertTrue(decision.conflicts.isEmpty)
        // Grants are the wallet's idempotency keys: one id is one grant, whichever source sent it.
        XCTAssertEqual(PositionedGrant(grant: grant(source: "cli"), position: LogPosition(partition: 0, offset: 3)).key,
                       PositionedGrant(grant: grant(source: "api"), position: LogPosition(partition: 0, offset: 4)).key)
    }

    /// A grant sent again with a new time (a retry, `tally grant` run twice) is a duplicate; another
    /// amount under its id is a conflict.
    func testAGrantRetriedWithANewTimeIsADuplicate() {
        let first = PositionedGrant(grant: grant(source: "cli"), position: LogPosition(partition: 0, offset: 0))
        var later = grant(source: "api")
        later.time = EventTime(microseconds: later.time.microseconds + 60_000_000)
        var more = grant(source: "cli")
        more.amountNanos += 1
        let decision = Deduplicator.decide([first, PositionedGrant(grant: later, position: LogPosition(partition: 0, offset: 1)),
                                            PositionedGrant(grant: more, position: LogPosition(partition: 0, offset: 2))], stored: [:])
        XCTAssertEqual(decision.accepted.map(\.position.offset), [0])
        XCTAssertEqual(decision.duplicates, 1)
        XCTAssertEqual(decision.conflicts.map(\.position.offset), [2])
    }

    private func grant(source: String) -> GrantEvent {
        GrantEvent(id: "g1", source: source, subject: "c", time: EventTime(microseconds: 1_000_000), amountNanos: 100_000_000_000,
                   currency: Currency("USD")!, priority: GrantEvent.defaultPriority, expiresAt: nil, grantSource: .purchase, extensions: [:])
    }

    func testSameIdForDifferentCustomersIsNotADuplicate() {
        let batch = [PositionedEvent(event: event("e1", customer: "a"), position: LogPosition(partition: 0, offset: 0)),
                     PositionedEvent(event: event("e1", customer: "b"), position: LogPosition(partition: 1, offset: 0))]
        XCTAssertEqual(Deduplicator.decide(batch, stored: [:]).accepted.count, 2)
    }

    /// Property: any split of the log into batches, and any interleaving of partitions,
    /// yields the same windows as consuming everything at once.
    func testWindowsDoNotDependOnBatchBoundariesOrInterleaving() {
        var random = SeededGenerator(seed: 2024)
        for trial in 0..<40 {
            // A log of 4 partitions; customers are pinned to partitions (the record key).
            var generator = LoadGenerator(seed: UInt64(trial), customers: 30, duplicateRate: 0.15,
                                          startMicroseconds: 1_790_000_000_000_000, spacingMicroseconds: 600_000_000)
            var partitions: [[PositionedEvent]] = Array(repeating: [], count: 4)
            for index in 0..<600 {
                var (event, _) = generator.next()
                if index % 97 == 0, let previous = partitions.flatMap({ $0 }).last {
                    // A conflict: a re-used id with other content.
                    event = previous.event
                    event.outputTokens += 1
                }
                let partition = Int(event.subject.utf8.reduce(0) { $0 &+ Int($1) } % 4)
                partitions[partition].append(PositionedEvent(event: event, position: LogPosition(partition: Int32(partition), offset: Int64(partitions[partition].count))))
            }
            let reference = consume([partitions.flatMap { $0 }])

            // Random interleaving preserving each partition's order, cut into random batches.
            var cursors = [0, 0, 0, 0]
            var interleaved: [PositionedEvent] = []
            while interleaved.count < partitions.map(\.count).reduce(0, +) {
                let p = Int.random(in: 0..<4, using: &random)
                guard cursors[p] < partitions[p].count else { continue }
                interleaved.append(partitions[p][cursors[p]])
                cursors[p] += 1
            }
            var batches: [[PositionedEvent]] = []
            var start = 0
            while start < interleaved.count {
                let size = Int.random(in: 1...120, using: &random)
                batches.append(Array(interleaved[start..<min(start + size, interleaved.count)]))
                start += size
            }
            let split = consume(batches)
            XCTAssertEqual(split.deltas, reference.deltas, "trial \(trial): windows differ")
            XCTAssertEqual(split.conflicts, reference.conflicts, "trial \(trial): conflicts differ")
            XCTAssertEqual(split.duplicates, reference.duplicates, "trial \(trial): duplicates differ")
        }
    }

    /// Consumes batches the way the store does: decide against keys stored so far, then store.
    private func consume(_ batches: [[PositionedEvent]]) -> (deltas: WindowDeltas, conflicts: Int, duplicates: Int) {
        var stored: [DedupKey: UInt64] = [:]
        var deltas = WindowDeltas()
        var conflicts = 0
        var duplicates = 0
        for batch in batches {
            let relevant = Dictionary(uniqueKeysWithValues: Deduplicator.keys(of: batch).compactMap { key in stored[key].map { (key, $0) } })
            let decision = Deduplicator.decide(batch, stored: relevant)
            for accepted in decision.accepted {
                stored[accepted.key] = accepted.contentHash
                deltas.add(accepted.event)
            }
            conflicts += decision.conflicts.count
            duplicates += decision.duplicates
        }
        return (deltas, conflicts, duplicates)
    }

    func testKeyCacheKeepsTheNewerGenerationsAndForgetsOnRequest() {
        var cache = DedupKeyCache(generationSize: 3)
        let keys = (0..<7).map { DedupKey(customerID: "c\($0 % 2)", source: "s", eventID: "e\($0)") }
        for (index, key) in keys.enumerated() { cache.insert(key, contentHash: UInt64(index)) }
        // Generations of 3: e0–e2 filled the first, e3–e5 replaced it, e6 starts a third.
        XCTAssertEqual(cache.count, 4)
        XCTAssertNil(cache[keys[0]])
        XCTAssertNil(cache[keys[2]])
        XCTAssertEqual(cache[keys[3]], 3)
        XCTAssertEqual(cache[keys[6]], 6)
        XCTAssertNil(cache[DedupKey(customerID: "c1", source: "s", eventID: "e6")], "the customer is part of the key")
        XCTAssertNil(cache[DedupKey(customerID: "c0e", source: "s", eventID: "6")], "the separator keeps the halves apart")
        cache.insert(keys[6], contentHash: 60)
        XCTAssertEqual(cache[keys[6]], 60, "a later fingerprint replaces the earlier")
        cache.removeAll()
        XCTAssertEqual(cache.count, 0)
        XCTAssertNil(cache[keys[6]])
    }

    /// Content hashes are stored with the dedup keys: a re-sent event must hash as it did
    /// under every earlier version, so these values may never change.
    func testContentHashesStayAsStored() throws {
        let time = try XCTUnwrap(EventTime("2026-11-29T13:43:26.007Z"))
        var event = UsageEvent(id: "evt-7", source: "tally://loadgen", subject: "cust-68", time: time, model: "o3-mini",
                               provider: "openai", feature: nil, environment: "production", inputTokens: 3718, outputTokens: 1970,
                               cacheReadInputTokens: 1481, reasoningOutputTokens: 1880, properties: ["region": "eu"])
        XCTAssertEqual(ContentHash.of(event), 15106202884479510133)
        event.properties = ["zone": "b", "region": "eu", "team": "search"]
        event.extensions = ["traceparent": "\"00-ab-cd-01\"", "dataschema": "\"s\""]
        XCTAssertEqual(ContentHash.of(event), 3747938455873073487)
        event.properties = [:]
        event.extensions = [:]
        XCTAssertEqual(ContentHash.of(event), 1257987606057256889)
    }

    func testFingerprintTableGrowsAndHoldsEveryFingerprint() {
        var table = FingerprintTable()
        var expected: [DedupKeyCache.Fingerprint: UInt64] = [:]
        // Low halves that share their low bits probe past each other; (0, 0) is the free-slot mark.
        var fingerprints = (0..<5_000).map { DedupKeyCache.Fingerprint(high: UInt64($0 % 7), low: UInt64($0) << 20) }
        fingerprints += [DedupKeyCache.Fingerprint(high: 0, low: 0), DedupKeyCache.Fingerprint(high: 1, low: 0)]
        for (index, fingerprint) in fingerprints.enumerated() {
            table.insert(fingerprint, contentHash: UInt64(index))
            expected[fingerprint] = UInt64(index)
        }
        table.insert(fingerprints[3], contentHash: 99)
        expected[fingerprints[3]] = 99
        XCTAssertEqual(table.count, expected.count)
        for (fingerprint, contentHash) in expected { XCTAssertEqual(table[fingerprint], contentHash) }
        XCTAssertNil(table[DedupKeyCache.Fingerprint(high: 8, low: 1 << 20)])
        XCTAssertNil(FingerprintTable()[DedupKeyCache.Fingerprint(high: 0, low: 0)])
    }

    func testKeysAreWrittenInTheKeyIndexOrder() {
        // Customers differing after 8 bytes, ids differing after "evt-", prefixes of each other, non-ASCII.
        let keys = [("customer-00000002", "evt-9"), ("customer-00000010", "evt-10"), ("customer-00000002", "evt-10"),
                    ("c", "b"), ("cé", "a"), ("c", "a"), ("customer-00000002", "evt-1"), ("cz", "a")]
        let candidates = keys.enumerated().map { offset, key in
            PositionedEvent(event: event(key.1, customer: key.0), position: LogPosition(partition: 0, offset: Int64(offset)))
        }
        let bytewise = candidates.sorted { a, b in
            a.key.customerID.utf8.elementsEqual(b.key.customerID.utf8)
                ? a.key.eventID.utf8.lexicographicallyPrecedes(b.key.eventID.utf8)
                : a.key.customerID.utf8.lexicographicallyPrecedes(b.key.customerID.utf8)
        }
        XCTAssertEqual(candidates.keyOrder().map { candidates[$0].position.offset }, bytewise.map(\.position.offset))
        XCTAssertEqual(candidates.keyOrder().map { candidates[$0].position.offset }, [5, 3, 6, 2, 0, 1, 7, 4])
    }

    func testRollupsAgreeWithHourlyRows() {
        var deltas = WindowDeltas()
        var generator = LoadGenerator(seed: 5, customers: 10, duplicateRate: 0, startMicroseconds: 1_790_000_000_000_000, spacingMicroseconds: 3_000_000_000)
        for _ in 0..<2000 { deltas.add(generator.next().event) }
        for coarse in [Granularity.day, .month] {
            var rolled: [WindowKey: UsageMeasures] = [:]
            for (key, measures) in deltas.rows(.hour) {
                rolled[WindowKey(dimensions: key.dimensions, granularity: coarse, start: coarse.windowStart(key.start)), default: UsageMeasures()] += measures
            }
            XCTAssertEqual(rolled, deltas.windows[coarse])
        }
        XCTAssertGreaterThan(deltas.rows(.day).count, deltas.rows(.month).count)
    }

    func testPoisonClassification() {
        XCTAssertEqual(ClassifiedRecord.classify(nil), .poison(PoisonReason(code: "empty", detail: "record has no value")))
        guard case .poison(let oversize) = ClassifiedRecord.classify(Array(repeating: 0x20, count: EventLimits.maxEventBytes + 1)) else { return XCTFail() }
        XCTAssertEqual(oversize.code, "oversize")
        guard case .poison(let malformed) = ClassifiedRecord.classify(Array("{".utf8)) else { return XCTFail() }
        XCTAssertEqual(malformed.code, "malformed_json")
        guard case .poison(let type) = ClassifiedRecord.classify(Array(#"{"specversion":"1.0","type":"x"}"#.utf8)) else { return XCTFail() }
        let valid = EventEncoder.encode(UsageEvent(id: "e", source: "s", subject: "acme", time: EventTime("2026-01-01T00:00:00Z")!, model: "m",
                                                   inputTokens: 1, outputTokens: 1))
        guard case .event = ClassifiedRecord.classify(valid, key: .some(Array("acme".utf8))) else { return XCTFail("keyed by its customer") }
        guard case .poison(let misKeyed) = ClassifiedRecord.classify(valid, key: .some(Array("other".utf8))) else { return XCTFail() }
        XCTAssertEqual(misKeyed.code, "key_mismatch")
        guard case .poison(let unkeyed) = ClassifiedRecord.classify(valid, key: .some(nil)) else { return XCTFail() }
        XCTAssertEqual(unkeyed.code, "key_mismatch")
        XCTAssertEqual(type.code, "unknown_type")
        guard case .poison(let invalid) = ClassifiedRecord.classify(Array(#"{"specversion":"1.0","type":"llm.usage"}"#.utf8)) else { return XCTFail() }
        XCTAssertEqual(invalid.code, "schema_invalid")
        // The consumers export a dead-letter counter per listed code from the start.
        for code in ["empty", oversize.code, malformed.code, type.code, misKeyed.code, invalid.code, "wrong_partition", "unsigned_credit"] {
            XCTAssertTrue(PoisonReason.codes.contains(code), code)
        }
    }
}
