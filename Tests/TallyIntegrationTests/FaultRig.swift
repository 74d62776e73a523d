import Foundation
import TallyCore
import TallyKafka
import TallyPostgres
import XCTest

/// The fault suite's size: `TALLY_FAULTS=large` (scripts/faults --large) or the CI size.
enum FaultScale {
    static let isLarge = ProcessInfo.processInfo.environment["TALLY_FAULTS"] == "large"
    static func pick(ci: Int, large: Int) -> Int { isLarge ? large : ci }
}

/// What the generator sent and got an acknowledgement for: its own record, never read back.
enum SentRecord: Sendable {
    case usage(UsageEvent)
    case grant(GrantEvent)
    case poison
}

/// The real stack for one fault-suite row: a database and topic, the aggregator and the rater
/// in their own groups, a generator that records every acknowledged record, a monitor of the
/// stored offsets, and the invariant checks.
final class FaultRig: @unchecked Sendable {
    let harness: AggregatorHarness
    var aggregatorGroup: String { harness.group + "-aggregator" }
    var raterGroup: String { harness.group }
    /// TALLY_DEBUG_BREAK for every process the rig starts (the suite's self-test).
    let breaking: [String: String]

    private let lock = NSLock()
    private var producer: KafkaProducer
    private var acked: [(record: SentRecord, position: LogPosition)] = []
    private var logEnd: [Int32: Int64] = [:]
    private(set) var serverErrors = 0
    private var generating = false
    private var generator: Task<Void, Never>?

    private(set) var aggregators: [ChildProcess] = []
    private(set) var raters: [ChildProcess] = []
    private(set) var ingest: ChildProcess?
    private(set) var ingestURL = ""
    private(set) var ingestKey = ""

    let monitor: OffsetMonitor
    /// Each fault: the groups it hit, when it began, and when it ended (a pause, an outage).
    private var faults: [(groups: [String], at: ContinuousClock.Instant, ended: ContinuousClock.Instant)] = []
    private(set) var injections = 0

    init(breaking invariants: [String] = []) throws {
        harness = try AggregatorHarness()
        breaking = invariants.isEmpty ? [:] : ["TALLY_DEBUG_BREAK": invariants.joined(separator: ",")]
        producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: harness.brokers), logger: TestStack.logger)
        try RaterIntegrationTests.applyPrices(harness)
        monitor = try OffsetMonitor(databaseURL: harness.databaseURL, topic: harness.topic)
    }

    deinit {
        monitor.stop()
        for process in aggregators + raters + [ingest].compactMap({ $0 }) { process.signal(SIGKILL); process.wait() }
    }

    /// A rig with one aggregator and one rater running (and tally-ingest, when asked).
    static func running(ingest: Bool = false, breaking invariants: [String] = []) throws -> FaultRig {
        let rig = try FaultRig(breaking: invariants)
        try rig.startAggregator()
        try rig.startRater()
        if ingest { try rig.startIngest() }
        return rig
    }

    // MARK: Processes

    @discardableResult
    func startAggregator(_ environment: [String: String] = [:]) throws -> ChildProcess {
        let process = try harness.startAggregator(["--group", aggregatorGroup, "--batch-size", "500"],
                                                  environment: breaking.merging(environment) { $1 })
        aggregators.append(process)
        return process
    }

    @discardableResult
    func startRater(_ environment: [String: String] = [:]) throws -> ChildProcess {
        let process = try harness.startRater(["--batch-size", "500", "--alerts-topic", "off"], environment: breaking.merging(environment) { $1 })
        raters.append(process)
        return process
    }

    /// Replaces a consumer that ended (killed, or it killed itself) with a new one of its kind.
    func restart(_ process: ChildProcess, environment: [String: String] = [:]) throws -> ChildProcess {
        process.wait()
        if let index = aggregators.firstIndex(where: { $0 === process }) {
            aggregators.remove(at: index)
            return try startAggregator(environment)
        }
        raters.removeAll { $0 === process }
        return try startRater(environment)
    }

    func stop(_ process: ChildProcess) {
        process.signal(SIGTERM)
        _ = process.wait(timeout: .seconds(30))
        process.signal(SIGKILL)
        process.wait()
        aggregators.removeAll { $0 === process }
        raters.removeAll { $0 === process }
    }

    func startIngest() throws {
        let output = try harness.tally(["keys", "create", "--name", "faults"])
        ingestKey = String(output[try XCTUnwrap(output.range(of: "tally_[0-9a-f]{8}_[0-9a-f]{48}", options: .regularExpression))])
        // A deliberate break runs the test-only tally-faults (see `AggregatorHarness.start`).
        let process = try ChildProcess(TestStack.executable(breaking.isEmpty ? "tally-ingest" : "tally-faults"), (breaking.isEmpty ? [] : ["tally-ingest"]) + [
            "--port", "0", "--host", "127.0.0.1", "--topic", harness.topic, "--database-url", harness.databaseURL,
        ], environment: breaking)
        ingest = process
        ingestURL = try process.listeningURL()
    }

    // MARK: The generator

    /// Publishes records and waits for every acknowledgement; what failed is sent again
    /// (ids make that safe) until the broker acknowledged it.
    func send(_ records: [(key: String, value: [UInt8], sent: SentRecord)]) async {
        var pending = records
        while !pending.isEmpty {
            let used = lock.withLock { producer }
            let results = await used.send(pending.map { TestStack.record(topic: harness.topic, key: $0.key, value: $0.value) })
            var failed: [(key: String, value: [UInt8], sent: SentRecord)] = []
            var replace = false
            lock.withLock {
                for (record, result) in zip(pending, results) {
                    switch result {
                    case .success(let report):
                        acked.append((record.sent, LogPosition(partition: report.partition, offset: report.offset)))
                        logEnd[report.partition] = max(logEnd[report.partition] ?? 0, report.offset + 1)
                    case .failure(let error):
                        failed.append(record)
                        replace = replace || error.requiresNewClient
                    }
                }
            }
            if replace || used.hasFatalError, let fresh = try? KafkaProducer(configuration: KafkaConfiguration(brokers: harness.brokers), logger: TestStack.logger) {
                lock.withLock { producer = fresh }
            }
            pending = failed
            if !pending.isEmpty { try? await Task.sleep(for: .milliseconds(200)) }
        }
    }

    func send(_ events: [UsageEvent]) async {
        await send(events.map { ($0.subject, EventEncoder.encode($0), SentRecord.usage($0)) })
    }

    func sendPoison(_ records: [(key: String, value: [UInt8])]) async {
        await send(records.map { ($0.key, $0.value, SentRecord.poison) })
    }

    func sendGrants(_ grants: [GrantEvent]) async {
        await send(grants.map { ($0.subject, EventEncoder.encode($0), SentRecord.grant($0)) })
    }

    /// Events through tally-ingest: those answered accepted are recorded with the partition and
    /// offset the answer names; any 5xx is counted (bad input must never cause one).
    @discardableResult
    func post(_ body: String, contentType: String = "application/x-ndjson", events: [UsageEvent] = []) throws -> HTTPResponse {
        let response = try TallyIntegrationTests.http("POST", ingestURL + "/v1/events", contentType: contentType, body: body,
                                                      authorization: "Bearer \(ingestKey)")
        if response.status >= 500 { lock.withLock { serverErrors += 1 } }
        guard response.status == 202, let object = try? JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any],
              let results = object["results"] as? [[String: Any]] else { return response }
        lock.withLock {
            for result in results where result["status"] as? String == "accepted" {
                let index = result["index"] as! Int
                let position = LogPosition(partition: Int32(result["partition"] as! Int), offset: Int64(result["offset"] as! Int))
                acked.append((.usage(events[index]), position))
                logEnd[position.partition] = max(logEnd[position.partition] ?? 0, position.offset + 1)
            }
        }
        return response
    }

    /// Publishes generated usage in chunks until `stopGenerating`, so faults land mid-stream.
    func startGenerating(seed: UInt64, customers: Int = 20, chunk: Int = FaultScale.pick(ci: 100, large: 300)) {
        lock.withLock { generating = true }
        generator = Task {
            var events = LoadGenerator(seed: seed, customers: customers, duplicateRate: 0, startMicroseconds: 1_793_491_200_000_000,
                                       spacingMicroseconds: 1_000_000, idPrefix: "g\(seed)")
            while lock.withLock({ generating }) {
                await send((0..<chunk).map { _ in
                    var event = events.next().event
                    event.subject = "fc-" + event.subject
                    return event
                })
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
    }

    func stopGenerating() async {
        lock.withLock { generating = false }
        await generator?.value
        generator = nil
    }

    // MARK: Faults

    /// Notes a fault that hit the consumers of `groups` now (recovery is measured from here).
    @discardableResult
    func fault(_ groups: [String]) -> Int {
        // Commits that landed before the fault but were not seen yet must not count as recovery.
        monitor.poll()
        return lock.withLock {
            let now = ContinuousClock.now
            faults.append((groups, now, now))
            injections += 1
            return faults.count - 1
        }
    }

    /// A fault that lasts (an outage, a pause) ended now: only commits after this count as recovery.
    func faultEnded(_ index: Int) {
        lock.withLock { faults[index].ended = .now }
    }

    func countInjections(_ count: Int) { lock.withLock { injections += count } }

    /// Time from the start of each fault until every partition of every group it hit committed
    /// again after the fault ended.
    func recoveryTimes() -> [Duration] {
        lock.withLock { faults }.compactMap { fault in
            let times = fault.groups.map { monitor.firstCommit(group: $0, after: fault.ended) }
            guard !times.contains(where: { $0 == nil }) else { return nil }
            return times.compactMap { $0 }.max().map { $0 - fault.at }
        }
    }

    /// Waits until both groups have consumed everything acknowledged.
    func waitSettled(timeout: Duration = .seconds(180)) throws -> Bool {
        let end = lock.withLock { logEnd }
        return try TestStack.eventually(timeout: timeout) {
            let aggregated = try harness.storedOffsets(group: aggregatorGroup)
            let rated = try harness.storedOffsets(group: raterGroup)
            return end.allSatisfy { aggregated[$0.key] == $0.value && rated[$0.key] == $0.value }
        }
    }

    // MARK: Invariants

    struct Report {
        var events = 0
        var lost = 0
        var doubleCounted = 0
        var failures: [String] = []
    }

    /// Checks every invariant against the generator's record; each failure is named.
    func check(replay: Bool = true) throws -> Report {
        var report = Report()
        let records = lock.withLock { acked }
        // The first acknowledged record of each (customer, id) counts: later ones are duplicates
        // or conflicts, and one customer's records share a partition, so offsets order them.
        var firstUsage: [String: (UsageEvent, LogPosition)] = [:]
        var firstGrant: [String: (GrantEvent, LogPosition)] = [:]
        var poison = 0
        for (record, position) in records {
            switch record {
            case .usage(let event):
                let key = event.subject + "\u{1}" + event.id
                if let seen = firstUsage[key], seen.1 < position { continue }
                firstUsage[key] = (event, position)
            case .grant(let grant):
                let key = grant.subject + "\u{1}" + grant.id
                if let seen = firstGrant[key], seen.1 < position { continue }
                firstGrant[key] = (grant, position)
            case .poison:
                poison += 1
            }
        }
        let counted = firstUsage.values.map(\.0)
        report.events = counted.count

        // Per-customer totals equal the recount of acknowledged distinct events, in every view.
        let expected = AggregatorHarness.recount(counted)
        for view in ["tally.usage_hourly", "tally.usage_daily", "tally.usage_monthly"] {
            let actual = try harness.totals(view)
            var lost = 0, doubled = 0
            for customer in Set(expected.keys).union(actual.keys) {
                let want = expected[customer]?[6] ?? 0, got = actual[customer]?[6] ?? 0
                lost += max(0, Int(want - got))
                doubled += max(0, Int(got - want))
                if expected[customer] != actual[customer] && view == "tally.usage_hourly" && want == got {
                    report.failures.append("totals: \(customer) has the right event count but other token totals")
                }
            }
            report.lost = max(report.lost, lost)
            report.doubleCounted = max(report.doubleCounted, doubled)
        }
        if report.lost > 0 { report.failures.append("lost: \(report.lost) acknowledged events not counted") }
        if report.doubleCounted > 0 { report.failures.append("double-counted: \(report.doubleCounted) events counted more than once") }

        // Nothing counted that was never acknowledged (or was rejected).
        let keys = try harness.connection.query("SELECT customer_id || chr(1) || event_id FROM tally.usage_event_keys").rows.map { $0[0]! }
        let phantoms = keys.filter { firstUsage[$0] == nil }
        if !phantoms.isEmpty { report.failures.append("phantom: \(phantoms.count) counted events were never acknowledged, e.g. \(phantoms[0])") }

        // Dead letters: exactly the poison injected, in each consumer's table.
        for group in [aggregatorGroup, raterGroup] {
            let letters = try harness.connection.query("SELECT count(*) FROM tally.dead_letters WHERE consumer_group = $1", [group]).int64(0, 0) ?? 0
            if letters != Int64(poison) { report.failures.append("dead letters: \(group) holds \(letters), \(poison) poison records were injected") }
        }

        // Wallets: balance = sum of its ledger and overage entries = grants − charges computed here.
        var grants: [String: Int64] = [:]
        for (grant, _) in firstGrant.values { grants[grant.subject, default: 0] += grant.amountNanos }
        var charges: [String: Int64] = [:]
        for line in RaterIntegrationTests.expectedLineCharges(counted) { charges[line.customer, default: 0] += line.nanos }
        let wallets = try harness.connection.query("""
            SELECT w.customer_id, w.balance_nanos, (SELECT coalesce(sum(amount_nanos), 0) FROM tally.wallet_ledger l WHERE l.customer_id = w.customer_id)
                   + (SELECT coalesce(sum(amount_nanos), 0) FROM tally.wallet_overage o WHERE o.customer_id = w.customer_id)
            FROM tally.wallets w
            """)
        var balances: [String: Int64] = [:]
        for row in 0..<wallets.rowCount {
            let customer = wallets.string(row, 0)!
            balances[customer] = try wallets.int64(row, 1)!
            if try wallets.int64(row, 1)! != wallets.int64(row, 2)! { report.failures.append("wallet: \(customer)'s balance is not the sum of its ledger and overage entries") }
        }
        for customer in Set(grants.keys).union(charges.keys) {
            let want = (grants[customer] ?? 0) - (charges[customer] ?? 0)
            if (balances[customer] ?? 0) != want {
                report.failures.append("wallet: \(customer) has \(balances[customer] ?? 0), grants − charges = \(want)")
                break
            }
        }

        // Stored offsets only move forward.
        let regressions = try monitor.regressions()
        if let regression = regressions.first {
            report.failures.append("offsets: \(regressions.count) moved backward, e.g. \(regression)")
        }
        // Bad input never causes a 5xx.
        if serverErrors > 0 { report.failures.append("server errors: \(serverErrors) answers were 5xx") }

        // A replay from offset zero rebuilds the same state, checksum for checksum (both at once).
        if replay {
            let replays = try [("aggregator", aggregatorGroup), ("rater", raterGroup)].map { consumer, group in
                (consumer, try ChildProcess(TestStack.executable("tally"), ["replay", "--consumer", consumer, "--topic", harness.topic,
                                                                             "--live-group", group, "--dry-run", "--database-url", harness.databaseURL]))
            }
            for (consumer, process) in replays {
                let status = process.wait(timeout: .seconds(180)) ?? -1
                if status != 0 { report.failures.append("replay: the \(consumer)'s replay differs (exit \(status)): \(process.log.suffix(600))") }
            }
        }
        return report
    }
}

/// Polls the stored offsets to note every move (for recovery times). Moves backward are
/// recorded by a trigger instead: a zombie's backward write can be overwritten by the new
/// owner's next commit within milliseconds, between two polls.
final class OffsetMonitor: @unchecked Sendable {
    private let connection: PostgresConnection
    private let topic: String
    private let lock = NSLock()
    /// One query at a time on the connection.
    private let pollLock = NSLock()
    private var last: [String: Int64] = [:]
    /// group → partition → when its offset was seen to move.
    private var commits: [String: [String: [ContinuousClock.Instant]]] = [:]
    private var running = true
    private var thread: Thread?

    init(databaseURL: String, topic: String) throws {
        // A short connect timeout: while PostgreSQL is down on purpose, a poll fails fast
        // instead of holding the monitor for half a minute (and delaying what it sees after).
        connection = try PostgresConnection(url: databaseURL, logger: TestStack.logger, connectTimeout: .milliseconds(300))
        self.topic = topic
        try connection.execute(script: """
            CREATE SCHEMA fault_rig;
            CREATE TABLE fault_rig.offset_regressions (
                consumer_group text, topic text, partition int, previous bigint, next bigint, at timestamptz DEFAULT clock_timestamp());
            CREATE FUNCTION fault_rig.note_regression() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO fault_rig.offset_regressions (consumer_group, topic, partition, previous, next)
                VALUES (NEW.consumer_group, NEW.topic, NEW.partition, OLD.next_offset, NEW.next_offset);
                RETURN NEW;
            END $$;
            CREATE TRIGGER offsets_move_backward AFTER UPDATE ON tally.consumer_offsets
                FOR EACH ROW WHEN (NEW.next_offset < OLD.next_offset) EXECUTE FUNCTION fault_rig.note_regression();
            """)
        let thread = Thread { [weak self] in
            while let self, self.lock.withLock({ self.running }) {
                self.poll()
                Thread.sleep(forTimeInterval: 0.05)
            }
        }
        self.thread = thread
        thread.start()
    }

    func stop() { lock.withLock { running = false } }

    /// Reads the offsets once (also called by the rig right after a fault).
    func poll() {
        // PostgreSQL may be stopped on purpose: skip the poll, try again.
        guard let result = pollLock.withLock({
            try? connection.query("SELECT consumer_group, partition, next_offset FROM tally.consumer_offsets WHERE topic = $1", [topic])
        }) else { return }
        let now = ContinuousClock.now
        lock.withLock {
            for row in 0..<result.rowCount {
                guard let group = result.string(row, 0), let partition = result.string(row, 1),
                      let offset = (try? result.int64(row, 2)).flatMap({ $0 }) else { continue }
                let key = group + "/" + partition
                if let previous = last[key], offset > previous {
                    commits[group, default: [:]][partition, default: []].append(now)
                }
                last[key] = offset
            }
        }
    }

    /// Every stored offset that was ever written backward, as the trigger recorded it.
    func regressions() throws -> [String] {
        let result = try pollLock.withLock {
            try connection.query("""
                SELECT consumer_group, partition, previous, next FROM fault_rig.offset_regressions
                WHERE topic = $1 ORDER BY at
                """, [topic])
        }
        return try (0..<result.rowCount).map { row in
            "\(result.string(row, 0)!)/\(result.string(row, 1)!): \(try result.int64(row, 2)!) → \(try result.int64(row, 3)!)"
        }
    }

    /// When every partition of the group had committed again after `instant` (a stopped
    /// instance's partitions only move once another instance took them over).
    func firstCommit(group: String, after instant: ContinuousClock.Instant) -> ContinuousClock.Instant? {
        lock.withLock {
            guard let partitions = commits[group], !partitions.isEmpty else { return nil }
            var latest = instant
            for times in partitions.values {
                guard let first = times.first(where: { $0 > instant }) else { return nil }
                latest = max(latest, first)
            }
            return latest
        }
    }
}
