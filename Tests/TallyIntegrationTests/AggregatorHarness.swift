import Foundation
import TallyCore
import TallyKafka
import TallyPostgres
import XCTest

/// A private database, topic pair and group for one consumer test, and helpers to drive it.
final class AggregatorHarness: @unchecked Sendable {
    let databaseURL: String
    private(set) var topic: String
    let group: String
    let connection: PostgresConnection
    let brokers: String
    private let producer: KafkaProducer
    /// Log end per partition, from the producer's delivery reports (Tansu's queried end is wrong).
    private(set) var logEnd: [Int32: Int64] = [:]
    private var processes: [ChildProcess] = []

    /// - Parameter sharedTopic: use an existing topic (another harness's) instead of creating one,
    ///   so two databases can consume the same log.
    init(partitions: Int = 4, sharedTopic: String? = nil) throws {
        brokers = try TestStack.brokers
        let base = try TestStack.databaseURL
        let name = TestStack.unique("tally_test")
        let admin = try PostgresConnection(url: base, logger: TestStack.logger)
        // A generated identifier, never input; CREATE DATABASE cannot take a parameter.
        try admin.query("CREATE DATABASE \(name)")
        // postgresql://user@host:port/DATABASE[?options]: swap the database name.
        let slash = try XCTUnwrap(base.lastIndex(of: "/"))
        let query = base[slash...].firstIndex(of: "?").map { String(base[$0...]) } ?? ""
        databaseURL = String(base[...slash]) + name + query
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"), ["migrate", "--database-url", databaseURL])
        XCTAssertEqual(status, 0, output)
        connection = try PostgresConnection(url: databaseURL, logger: TestStack.logger)
        topic = sharedTopic ?? TestStack.unique("test.usage")
        group = TestStack.unique("consumer")
        if sharedTopic == nil {
            let kafkaAdmin = try KafkaAdmin(configuration: KafkaConfiguration(brokers: brokers), logger: TestStack.logger)
            try kafkaAdmin.createTopic(topic, partitions: partitions)
            try kafkaAdmin.createTopic(topic + ".dlq", partitions: partitions)
        }
        producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: brokers), logger: TestStack.logger)
    }

    deinit {
        for process in processes { process.signal(SIGKILL); process.wait() }
    }

    /// Publishes raw values keyed by customer and records the log end.
    func publish(_ records: [(key: String, value: [UInt8])]) async throws {
        try await record(producer.send(records.map { TestStack.record(topic: topic, key: $0.key, value: $0.value) }))
    }

    func publish(_ events: [UsageEvent], partition: Int32? = nil) async throws {
        try await record(producer.send(events.map {
            ProducerRecord(topic: topic, key: Array($0.subject.utf8), value: EventEncoder.encode($0), partition: partition)
        }))
    }

    /// Publishes events with the record timestamps (CreateTime, ms) given beside them.
    func publish(_ events: [(event: UsageEvent, timestamp: Int64)]) async throws {
        try await record(producer.send(events.map {
            ProducerRecord(topic: topic, key: Array($0.event.subject.utf8), value: EventEncoder.encode($0.event), timestampMilliseconds: $0.timestamp)
        }))
    }

    private func record(_ results: [Result<DeliveryReport, KafkaError>]) throws {
        for result in results {
            let report = try result.get()
            logEnd[report.partition] = max(logEnd[report.partition] ?? 0, report.offset + 1)
        }
    }

    /// Moves the harness to a new, empty topic pair, as a broker on new storage presents its log:
    /// later publishes, consumers and waits use it; PostgreSQL is left as it is.
    func moveToNewTopic(partitions: Int = 4) throws {
        let kafkaAdmin = try KafkaAdmin(configuration: KafkaConfiguration(brokers: brokers), logger: TestStack.logger)
        topic = TestStack.unique("test.usage")
        try kafkaAdmin.createTopic(topic, partitions: partitions)
        try kafkaAdmin.createTopic(topic + ".dlq", partitions: partitions)
        logEnd = [:]
    }

    /// Records the log end of a topic another harness published to.
    func adoptLogEnd(of other: AggregatorHarness) { logEnd = other.logEnd }

    /// Runs the `tally` CLI against this harness's database and topic; returns its exit status and output.
    func tallyStatus(_ arguments: [String]) throws -> (status: Int32, output: String) {
        try ChildProcess.run(TestStack.executable("tally"), arguments + ["--database-url", databaseURL])
    }

    /// Runs the `tally` CLI against this harness's database; fails the test when it exits non-zero.
    @discardableResult
    func tally(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"), arguments + ["--database-url", databaseURL])
        XCTAssertEqual(status, 0, "tally \(arguments.joined(separator: " ")): \(output)", file: file, line: line)
        return output
    }

    /// Starts tally-ingest on the harness's topic and database; answers it, its base URL and an API key.
    func startIngest(keyOptions: [String] = [], extra: [String] = []) throws -> (process: ChildProcess, base: String, apiKey: String) {
        let apiKey = try createKey(keyOptions)
        let ingest = try ChildProcess(TestStack.executable("tally-ingest"), ["--port", "0", "--host", "127.0.0.1", "--topic", topic,
                                                                             "--database-url", databaseURL] + extra)
        return (ingest, try ingest.listeningURL(), apiKey)
    }

    /// An API key in the harness's database, made with the real CLI.
    func createKey(_ options: [String] = []) throws -> String {
        let (status, output) = try ChildProcess.run(TestStack.executable("tally"),
                                                    ["keys", "create", "--name", "contract", "--database-url", databaseURL] + options)
        XCTAssertEqual(status, 0, output)
        return try XCTUnwrap(output.split(separator: "\n").first { $0.hasPrefix("tally_") }.map(String.init))
    }

    /// Starts an aggregator instance on this harness's topic, group and database.
    @discardableResult
    func startAggregator(_ extra: [String] = [], environment: [String: String] = [:]) throws -> ChildProcess {
        try startConsumer("tally-aggregator", extra, environment: environment)
    }

    /// Starts a rater instance on this harness's topic, group and database.
    @discardableResult
    func startRater(_ extra: [String] = [], environment: [String: String] = [:]) throws -> ChildProcess {
        try startConsumer("tally-rater", extra, environment: environment)
    }

    /// A consumer asked for a deliberate break or a fault knob runs as the test-only `tally-faults`:
    /// the same command with TallyTesting's fault decorators around its store.
    private func startConsumer(_ executable: String, _ extra: [String], environment: [String: String]) throws -> ChildProcess {
        let faulty = environment.keys.contains { $0 == "TALLY_DEBUG_BREAK" || $0.hasPrefix("TALLY_FAULT_") }
        let process = try ChildProcess(TestStack.executable(faulty ? "tally-faults" : executable), (faulty ? [executable] : []) + [
            "--database-url", databaseURL, "--topic", topic, "--group", group,
            "--session-timeout-ms", "6000", "--stats-interval-seconds", "2", "--batch-size", "2000",
            "--ops-address", "127.0.0.1:0",
        ] + extra, environment: environment)
        processes.append(process)
        return process
    }

    /// Stored next_offset per partition (of this harness's group unless another is given).
    func storedOffsets(group: String? = nil) throws -> [Int32: Int64] {
        // Retrying: some tests restart PostgreSQL under the harness too.
        let result = try connection.retrying { try $0.query("SELECT partition, next_offset FROM tally.consumer_offsets WHERE consumer_group = $1 AND topic = $2", [group ?? self.group, topic]) }
        var offsets: [Int32: Int64] = [:]
        for row in 0..<result.rowCount { offsets[Int32(try result.int64(row, 0)!)] = try result.int64(row, 1)! }
        return offsets
    }

    /// Waits until every partition's stored offset reaches the log end.
    func waitUntilConsumed(timeout: Duration = .seconds(120), group: String? = nil) throws -> Bool {
        try TestStack.eventually(timeout: timeout) {
            let stored = try storedOffsets(group: group)
            return logEnd.allSatisfy { stored[$0.key] == $0.value }
        }
    }

    /// Per-customer totals from one of the views.
    func totals(_ view: String = "tally.usage_hourly") throws -> [String: [Int128]] {
        // `view` is one of the three fixed view names used by the tests.
        let result = try connection.query("""
            SELECT customer_id, sum(input_tokens), sum(output_tokens), sum(cache_read_input_tokens), sum(cache_write_input_tokens),
                   sum(reasoning_output_tokens), sum(total_tokens), sum(event_count)
            FROM \(view) GROUP BY customer_id
            """)
        var totals: [String: [Int128]] = [:]
        for row in 0..<result.rowCount { totals[result.string(row, 0)!] = try (1...7).map { try result.int128(row, $0)! } }
        return totals
    }

    /// The test's own recount of distinct events, written independently of the aggregator's code.
    /// Per customer, what the windows must hold: each (customer, source, id) counted once, the first.
    static func recount(_ events: [UsageEvent]) -> [String: [Int128]] {
        var seen = Set<String>()
        var totals: [String: [Int128]] = [:]
        for event in events where seen.insert(event.subject + "\u{1}" + event.source + "\u{1}" + event.id).inserted {
            var row = totals[event.subject] ?? Array(repeating: 0, count: 7)
            row[0] += Int128(event.inputTokens)
            row[1] += Int128(event.outputTokens)
            row[2] += Int128(event.cacheReadInputTokens)
            row[3] += Int128(event.cacheWriteInputTokens)
            row[4] += Int128(event.reasoningOutputTokens)
            row[5] += Int128(event.inputTokens) + Int128(event.outputTokens)
            row[6] += 1
            totals[event.subject] = row
        }
        return totals
    }

    /// Checks every view against the recount, and the rollups against each other.
    func assertTotals(equal expected: [String: [Int128]], file: StaticString = #filePath, line: UInt = #line) throws {
        for view in ["tally.usage_hourly", "tally.usage_daily", "tally.usage_monthly"] {
            let actual = try totals(view)
            XCTAssertEqual(actual.count, expected.count, "\(view): customers", file: file, line: line)
            for (customer, row) in expected where actual[customer] != row {
                XCTFail("\(view) \(customer): expected \(row), got \(actual[customer] ?? [])", file: file, line: line)
            }
        }
    }

    static func events(count: Int, seed: UInt64, customers: Int = 40, prefix: String = "evt") -> [UsageEvent] {
        var generator = LoadGenerator(seed: seed, customers: customers, duplicateRate: 0, startMicroseconds: 1_793_491_200_000_000,
                                      spacingMicroseconds: 7_000_000, idPrefix: prefix)
        return (0..<count).map { _ in generator.next().event }
    }
}

extension ChildProcess {
    /// The port the process's ops endpoint bound, from its "ops endpoint on http://…" log line.
    var opsPort: Int? {
        guard let range = log.range(of: #"ops endpoint on http://[0-9.]+:([0-9]+)"#, options: .regularExpression) else { return nil }
        return Int(log[range].split(separator: ":").last ?? "")
    }

    /// Waits (up to 30 s) for tally-ingest's "listening on" line and answers its base URL on loopback.
    func listeningURL(file: StaticString = #filePath, line: UInt = #line) throws -> String {
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) { log.contains("listening on http://") }, log, file: file, line: line)
        let range = try XCTUnwrap(log.range(of: #"listening on http://[0-9.]+:[0-9]+"#, options: .regularExpression), log, file: file, line: line)
        return "http://127.0.0.1:" + (log[range].split(separator: ":").last.map(String.init) ?? "")
    }
}

/// Prometheus text scraped from a process's ops endpoint.
struct MetricsScrape {
    let text: String

    /// The value of the unlabelled sample `name`.
    func sample(_ name: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
    }

    /// Scrapes until `settled` holds (a loop counts a batch once it settles it, just after the
    /// commit PostgreSQL already shows), for at most 10 s; returns the last scrape.
    static func waiting(port: Int, until settled: (MetricsScrape) -> Bool) throws -> MetricsScrape {
        var scrape = MetricsScrape(text: "")
        _ = try TestStack.eventually(timeout: .seconds(10)) {
            scrape = MetricsScrape(text: try httpGet("http://127.0.0.1:\(port)/metrics").body)
            return settled(scrape)
        }
        return scrape
    }
}

/// GETs a URL on the loopback interface; returns status and body.
func httpGet(_ url: String) throws -> (status: Int, body: String) {
    let (status, output) = try ChildProcess.run("/usr/bin/env", ["python3", "-c", """
        import sys, urllib.request, urllib.error
        try:
            r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())
        except urllib.error.HTTPError as e:
            print(e.code); print(e.read().decode())
        """, url])
    guard status == 0, let newline = output.firstIndex(of: "\n"), let code = Int(output[..<newline]) else {
        throw NSError(domain: "httpGet", code: Int(status), userInfo: [NSLocalizedDescriptionKey: output])
    }
    return (code, String(output[output.index(after: newline)...]))
}

extension TestStack {
    /// A built executable of this package (the debug build scripts/test made).
    static func executable(_ name: String) -> String {
        root.appendingPathComponent(".build/debug/\(name)").path
    }
}
