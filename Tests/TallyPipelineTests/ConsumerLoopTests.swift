import Foundation
import Logging
import TallyCore
import TallyKafka
import TallyPipeline
import TallyTesting
import XCTest

/// The consumer loop in-process, over in-memory twins of the broker and the database: the paths
/// that otherwise need killed processes (fencing, resync, rebalances, lanes) in milliseconds.
final class ConsumerLoopTests: XCTestCase {
    let logger = Logger(label: "tally.test") { _ in SwiftLogNoOpLogHandler() }

    /// `count` generated usage events of 12 customers, one hour apart every 60 events.
    func events(_ count: Int, seed: UInt64, prefix: String = "evt") -> [UsageEvent] {
        var generator = LoadGenerator(seed: seed, customers: 12, duplicateRate: 0, startMicroseconds: 1_793_491_200_000_000,
                                      spacingMicroseconds: 60_000_000, idPrefix: prefix)
        return (0..<count).map { _ in generator.next().event }
    }

    /// The test's own count, independent of the loop and the dedup code: per customer, the sums
    /// (input, output, cache read, cache write, reasoning, total, events) of each distinct
    /// (customer, source, id), first sighting only.
    func recount(_ events: [UsageEvent]) -> [String: [Int128]] {
        var seen = Set<[String]>()
        var totals: [String: [Int128]] = [:]
        for event in events where seen.insert([event.subject, event.source, event.id]).inserted {
            let add: [Int128] = [Int128(event.inputTokens), Int128(event.outputTokens), Int128(event.cacheReadInputTokens),
                                 Int128(event.cacheWriteInputTokens), Int128(event.reasoningOutputTokens),
                                 Int128(event.inputTokens) + Int128(event.outputTokens), 1]
            totals[event.subject] = zip(totals[event.subject] ?? Array(repeating: 0, count: 7), add).map { $0 + $1 }
        }
        return totals
    }

    /// A topic holding `count` generated events, and the events.
    func topic(with count: Int, seed: UInt64) -> (InMemoryTopic, [UsageEvent]) {
        let topic = InMemoryTopic()
        let sent = events(count, seed: seed)
        for event in sent { topic.append(event) }
        return (topic, sent)
    }

    /// Checks the database holds exactly `expected`'s counts and stands at the log end.
    func assertCountedExactly(_ expected: [UsageEvent], in database: InMemoryDatabase, topic: InMemoryTopic,
                              file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(database.monthlyTotals, recount(expected), file: file, line: line)
        XCTAssertEqual(database.snapshot.offsets, logEnds(topic), "the loop moved past every record", file: file, line: line)
    }

    func settings(_ topic: InMemoryTopic, batchSize: Int = 20_000) -> ConsumerSettings {
        var settings = ConsumerSettings(group: "tally-aggregator", metricsPrefix: "tally_aggregator")
        settings.topic = topic.name
        settings.deadLetterTopic = topic.name + ".dlq"
        settings.batchSize = batchSize
        settings.batchTimeout = .milliseconds(1)
        settings.statsInterval = .seconds(3600)
        settings.exitWhenCaughtUp = true
        return settings
    }

    /// Runs a loop until it has committed the whole log (or its stop flag is set).
    @discardableResult
    func run(_ topic: InMemoryTopic, store: any ConsumerStore, source: ScriptedRecordSource? = nil, batchSize: Int = 20_000,
             sink: InMemoryDeadLetterSink = InMemoryDeadLetterSink(), stop: SharedFlag = SharedFlag()) throws -> ConsumerLoop {
        let loop = ConsumerLoop(source: source ?? ScriptedRecordSource(topic: topic), deadLetters: sink, store: store,
                                settings: settings(topic, batchSize: batchSize), logger: logger, stop: stop)
        try loop.run()
        return loop
    }

    func logEnds(_ topic: InMemoryTopic) -> [Int32: Int64] {
        Dictionary(uniqueKeysWithValues: (0..<topic.partitionCount).map { ($0, topic.end($0)) }.filter { $0.1 > 0 })
    }

    func testPoisonRecordsAreSetAsideAndEverythingElseCountsOnce() throws {
        let (topic, sent) = self.topic(with: 300, seed: 1)
        for event in sent.prefix(30) { topic.append(event) }
        let poison: [(String, String)] = [
            ("{oops", "malformed_json"),
            (#"{"specversion":"1.0","id":"bad-1","source":"t","type":"llm.usage","subject":"cust-1","time":"2026-11-01T00:00:00Z","data":{"model":"m","input_tokens":-5,"output_tokens":1}}"#, "schema_invalid"),
            (#"{"specversion":"1.0","id":"bad-2","source":"t","type":"llm.other","subject":"cust-1","time":"2026-11-01T00:00:00Z","data":{}}"#, "unknown_type"),
        ]
        var poisonPositions: [LogPosition: String] = [:]
        for (value, code) in poison { poisonPositions[topic.append(key: "cust-1", value: Array(value.utf8))] = code }
        for event in events(100, seed: 2, prefix: "after") { topic.append(event) }

        let database = InMemoryDatabase()
        let sink = InMemoryDeadLetterSink()
        let loop = try run(topic, store: InMemoryConsumerStore(database: database), batchSize: 64, sink: sink)

        XCTAssertEqual(database.monthlyTotals, recount(sent + events(100, seed: 2, prefix: "after")))
        XCTAssertEqual(database.snapshot.deadLetters, poisonPositions)
        XCTAssertEqual(sink.records.count, 3)
        XCTAssertTrue(sink.records.allSatisfy { $0.topic == "tally.usage.dlq" })
        XCTAssertEqual(loop.stats.duplicates, 30)
        XCTAssertEqual(database.snapshot.offsets, logEnds(topic), "the loop moved past every record")
    }

    /// Instance A loses its partitions to B between two batches without noticing (a zombie):
    /// its next commit is fenced and writes nothing; B resumes from the stored offsets.
    func testAZombieInstanceIsFencedAndNothingCountsTwice() throws {
        let (topic, sent) = self.topic(with: 400, seed: 3)
        let database = InMemoryDatabase()
        let instanceB = InMemoryConsumerStore(database: database)
        let stopA = SharedFlag()
        let zombie = FaultyStore(InMemoryConsumerStore(database: database), beforeCommit: { attempt in
            guard attempt == 3 else { return }
            _ = try? instanceB.claim([0, 1, 2, 3])
            stopA.set()
        })
        let loopA = try run(topic, store: zombie, source: ScriptedRecordSource(topic: topic, recordsPerPoll: 40), stop: stopA)
        XCTAssertEqual(loopA.stats.fencedBatches, 1)
        XCTAssertEqual(database.committedTransactions, 2, "the fenced batch wrote nothing")

        try run(topic, store: instanceB)
        assertCountedExactly(sent, in: database, topic: topic)
    }

    /// A COMMIT that landed but whose reply was lost: the retry finds the offsets moved under its
    /// own epoch, writes nothing, and the loop resumes from the stored offsets.
    func testALostCommitReplyResyncsInsteadOfCountingTwice() throws {
        let (topic, sent) = self.topic(with: 300, seed: 4)
        let database = InMemoryDatabase()
        let store = FaultyStore(InMemoryConsumerStore(database: database), faults: [2: .loseCommitReply])
        let loop = try run(topic, store: store, source: ScriptedRecordSource(topic: topic, recordsPerPoll: 50))
        XCTAssertEqual(database.monthlyTotals, recount(sent))
        XCTAssertEqual(loop.stats.duplicates, 0, "the landed batch was not applied again as duplicates")
        XCTAssertEqual(database.snapshot.offsets, logEnds(topic))
    }

    /// Partitions revoked and assigned again while a batch is in flight: the batch is finished
    /// before the rebalance is acted on, and reading resumes from the stored offsets.
    func testARebalanceDuringABatchFinishesTheBatchFirst() throws {
        let (topic, sent) = self.topic(with: 400, seed: 5)
        let database = InMemoryDatabase()
        let source = ScriptedRecordSource(topic: topic, recordsPerPoll: 30)
        let moved = [TopicPartition(topic.name, 1), TopicPartition(topic.name, 3)]
        source.schedule(.revoked(moved, lost: false), atPoll: 3)
        source.schedule(.assigned(moved), atPoll: 6)
        let store = FaultyStore(InMemoryConsumerStore(database: database), commitDelay: .milliseconds(5))
        try run(topic, store: store, source: source)
        assertCountedExactly(sent, in: database, topic: topic)
    }

    /// Two commit lanes, the second failing once after the first committed its part: the retry
    /// writes only the second part, and the first part's counts are reported once.
    func testCommitLanesLandPartOfABatchOnce() throws {
        let (topic, sent) = self.topic(with: 300, seed: 6)
        for event in sent.prefix(20) { topic.append(event) }
        let database = InMemoryDatabase()
        let lanes = CommitLanes([InMemoryConsumerStore(database: database),
                                 FaultyStore(InMemoryConsumerStore(database: database), faults: [1: .failBeforeCommit])])
        let loop = try run(topic, store: lanes)
        XCTAssertEqual(database.monthlyTotals, recount(sent))
        XCTAssertEqual(loop.stats.accepted, 300, "the landed lane's accepted events are reported, not lost")
        XCTAssertEqual(loop.stats.duplicates, 20)
        XCTAssertEqual(database.snapshot.offsets, logEnds(topic))
    }

    /// The database says partition 1 was counted further than its log goes (the broker lost
    /// records): the partition is not read, the gap is recorded with the log end, the other
    /// partitions are counted, and a run that must reach the log end says why it cannot.
    func testAPartitionWhoseLogEndsBelowItsStoredOffsetIsNotRead() throws {
        let (topic, sent) = self.topic(with: 300, seed: 8)
        let database = InMemoryDatabase()
        let end = topic.end(1)
        database.setStoredOffset(partition: 1, to: end + 5)
        XCTAssertThrowsError(try run(topic, store: InMemoryConsumerStore(database: database))) { error in
            XCTAssertTrue("\(error)".contains("partitions 1 (log end \(end), stored \(end + 5))"), "\(error)")
        }
        XCTAssertEqual(database.logGaps, [1: end])
        XCTAssertEqual(database.snapshot.offsets[1], end + 5, "nothing of partition 1 was committed")
        let elsewhere = sent.filter { KeyPartitioner.murmur2.partition(of: Array($0.subject.utf8), partitions: 4) != 1 }
        XCTAssertEqual(database.monthlyTotals, recount(elsewhere))

        // Restarted after the log grew past the stored offset: the recorded gap still holds, so
        // the records appended below the stored offset are not taken for counted ones.
        let later = events(200, seed: 9, prefix: "later").filter { KeyPartitioner.murmur2.partition(of: Array($0.subject.utf8), partitions: 4) == 1 }
        for event in later { topic.append(event) }
        XCTAssertGreaterThan(topic.end(1), end + 5)
        XCTAssertThrowsError(try run(topic, store: InMemoryConsumerStore(database: database)))
        XCTAssertEqual(database.snapshot.offsets[1], end + 5, "still nothing of partition 1")
        XCTAssertEqual(database.monthlyTotals, recount(elsewhere))
    }

    /// The state after the log depends only on the log: not on batch boundaries, the number of
    /// commit lanes, or a rebalance. Duplicates, conflicts and poison included.
    func testTheStateDependsOnlyOnTheLog() throws {
        let topic = InMemoryTopic()
        let sent = events(500, seed: 7)
        for (index, event) in sent.enumerated() {
            topic.append(event)
            if index % 9 == 0 { topic.append(event) }
            if index % 50 == 0 {
                var changed = event
                changed.inputTokens += 1
                topic.append(changed)
            }
            if index % 97 == 0 { topic.append(key: event.subject, value: Array("not json".utf8)) }
        }
        func replay(recordsPerPoll: Int, lanes: Int, rebalance: Bool = false) throws -> InMemoryDatabase.Snapshot {
            let database = InMemoryDatabase()
            let stores: [any ConsumerStore] = (0..<lanes).map { _ in InMemoryConsumerStore(database: database) }
            let source = ScriptedRecordSource(topic: topic, recordsPerPoll: recordsPerPoll)
            if rebalance {
                source.schedule(.revoked([TopicPartition(topic.name, 2)], lost: true), atPoll: 2)
                source.schedule(.assigned([TopicPartition(topic.name, 2)]), atPoll: 3)
            }
            try run(topic, store: lanes == 1 ? stores[0] : CommitLanes(stores), source: source)
            XCTAssertEqual(source.undeliveredRebalances, 0, "the scripted rebalance happened")
            return database.snapshot
        }
        let reference = try replay(recordsPerPoll: .max, lanes: 1)
        XCTAssertEqual(reference.conflicts.count, 10)
        XCTAssertEqual(reference.deadLetters.count, 6)
        for (perPoll, lanes, rebalance) in [(1, 1, false), (7, 2, false), (64, 1, true), (333, 2, true)] {
            XCTAssertEqual(try replay(recordsPerPoll: perPoll, lanes: lanes, rebalance: rebalance), reference,
                           "\(perPoll) records per poll, \(lanes) lanes, rebalance \(rebalance)")
        }
    }

    /// The dedup horizon (35 days): once a partition's log time has moved 40 days on, copies of
    /// its first events, and a new event carrying a 40-day-old time under a backdated record
    /// timestamp, are dead-lettered as past_dedup_horizon; an event 34 days late still counts.
    /// The same decisions in one run over the whole log and in runs that stop after the clocks
    /// moved and go on later (the clocks read back by a claim), with lost commit replies (read
    /// back by a resync), rebalances, lanes and any batch size.
    func testEventsPastTheDedupHorizonAreRefusedAlikeInEveryRun() throws {
        let day: Int64 = 86_400_000
        let base: Int64 = 1_793_491_200_000  // 2026-11-01T00:00:00Z, the generated events' first time
        let topic = InMemoryTopic()
        // The same records up to each partition's jump: what a first run reads before it stops.
        let firstTopic = InMemoryTopic()
        var inFirstPart = true
        var clocks: [Int32: Int64] = [:]
        func append(_ event: UsageEvent, at timestamp: Int64) -> LogPosition {
            if inFirstPart { firstTopic.append(event, timestampMilliseconds: timestamp) }
            let position = topic.append(event, timestampMilliseconds: timestamp)
            clocks[position.partition] = max(clocks[position.partition] ?? timestamp, timestamp)
            return position
        }
        let sent = events(300, seed: 11)
        for (index, event) in sent.enumerated() { _ = append(event, at: base + Int64(index) * 1000) }
        // Every customer's partition moves 40 days on, with an event of that day.
        var jumps: [UsageEvent] = []
        for customer in Set(sent.map(\.subject)).sorted() {
            var jump = sent.first { $0.subject == customer }!
            jump.id = "jump-\(customer)"
            jump.time = EventTime(microseconds: (base + 40 * day) * 1000)
            jumps.append(jump)
            _ = append(jump, at: base + 40 * day)
        }
        inFirstPart = false
        // From here on, only the clocks stored or carried from the first part refuse these.
        var refused = Set<LogPosition>()
        var backdated = sent[0]
        backdated.id = "backdated"
        refused.insert(append(backdated, at: base))  // a producer clock 40 days behind: the partition's clock stands
        for event in sent.prefix(50) { refused.insert(append(event, at: base)) }
        // A copy `tally pricing rate-unpriced` sent: judged by its first copy (a duplicate), not refused.
        topic.append(key: sent[2].subject, value: EventEncoder.encode(sent[2]), headers: [KafkaHeader(rateUnpricedHeader, Array("1".utf8))],
                     timestampMilliseconds: base)
        var late = sent[1]
        late.id = "late-34-days"
        late.time = EventTime(microseconds: (base + 6 * day) * 1000)
        _ = append(late, at: base)

        /// The first part (`firstTopic`) in one run, then the whole log in another with the given
        /// faults, from the offsets and clocks the first stored; or, with `whole`, everything in one run.
        func consume(whole: Bool = false, recordsPerPoll: Int = .max, lanes: Int = 1, rebalance: Bool = false,
                     loseReply: Bool = false) throws -> InMemoryDatabase.Snapshot {
            let database = InMemoryDatabase()
            if !whole { try run(firstTopic, store: InMemoryConsumerStore(database: database)) }
            let stores: [any ConsumerStore] = (0..<lanes).map { lane in
                let store = InMemoryConsumerStore(database: database)
                return loseReply && lane == 0 ? FaultyStore(store, faults: [1: .loseCommitReply]) : store
            }
            let source = ScriptedRecordSource(topic: topic, recordsPerPoll: recordsPerPoll)
            if rebalance {
                source.schedule(.revoked([TopicPartition(topic.name, 2)], lost: true), atPoll: 2)
                source.schedule(.assigned([TopicPartition(topic.name, 2)]), atPoll: 3)
            }
            try run(topic, store: lanes == 1 ? stores[0] : CommitLanes(stores), source: source)
            XCTAssertEqual(database.monthlyTotals, recount(sent + jumps + [late]), "\(recordsPerPoll) per poll, \(lanes) lanes")
            return database.snapshot
        }
        let reference = try consume(whole: true)
        XCTAssertEqual(Set(reference.deadLetters.keys), refused)
        XCTAssertTrue(reference.deadLetters.values.allSatisfy { $0 == "past_dedup_horizon" })
        XCTAssertEqual(reference.logClocks, clocks, "each partition's clock is its greatest record timestamp")
        for (perPoll, lanes, rebalance, loseReply) in [(Int.max, 1, false, false), (1, 1, false, true), (7, 2, false, true),
                                                       (3, 1, true, false), (5, 2, true, true)] {
            XCTAssertEqual(try consume(recordsPerPoll: perPoll, lanes: lanes, rebalance: rebalance, loseReply: loseReply), reference,
                           "\(perPoll) records per poll, \(lanes) lanes, rebalance \(rebalance), lost reply \(loseReply)")
        }
    }
}
