import Foundation
import TallyCore
import XCTest

/// Issue #22: the local stack with its durable engine (Tansu on SeaweedFS S3) keeps the log and
/// everything PostgreSQL holds across `stack down`/`up` and across kill -9 of the broker and of
/// its storage. A private stack of its own (other ports, other folder), started by scripts/stack.
final class DurableStackTests: XCTestCase {
    var directory = ""
    var environment: [String: String] = [:]

    override func setUpWithError() throws {
        let main = try XCTUnwrap(ProcessInfo.processInfo.environment["TALLY_STACK_DIR"], "run through scripts/test")
        directory = main + "/" + TestStack.unique("stack-test")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        // The PyPI packages and the LiteLLM file the main stack installed serve this one too.
        for shared in ["python", "litellm"] {
            try FileManager.default.createSymbolicLink(atPath: directory + "/" + shared, withDestinationPath: main + "/" + shared)
        }
        environment = ["TALLY_STACK_DIR": directory, "TALLY_PG_PORT": "55442", "TALLY_KAFKA_PORT": "19102", "TALLY_S3_PORT": "18433",
                       "TALLY_BROKER_STORAGE": "s3", "TALLY_STACK_SKIP_BUILD": "1",
                       // The main stack's Prometheus has the port.
                       "TALLY_STACK_PROMETHEUS": "off"]
    }

    override func tearDown() {
        _ = try? stack("down")
        // PostgreSQL's folder may live outside (see scripts/stack): removed too, so runs leave nothing.
        if let pgroot = try? String(contentsOfFile: directory + "/pgroot", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines),
           !pgroot.hasPrefix(directory) {
            try? FileManager.default.removeItem(atPath: pgroot)
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    @discardableResult
    func stack(_ argument: String) throws -> String {
        let (status, output) = try ChildProcess.run("/bin/bash", [TestStack.root.appendingPathComponent("scripts/stack").path, argument],
                                                    environment: environment)
        XCTAssertEqual(status, 0, "scripts/stack \(argument): \(output)")
        return output
    }

    /// This stack's `scripts/stack env`, as a process environment.
    func stackEnvironment() throws -> [String: String] {
        var values = environment
        // Its own settings (PATH and the library paths are the main stack's, which this process has).
        for line in try stack("env").split(separator: "\n") where line.hasPrefix("export TALLY_") || line.hasPrefix("export PGPASSFILE=") {
            let assignment = line.dropFirst("export ".count)
            guard let equals = assignment.firstIndex(of: "=") else { continue }
            values[String(assignment[..<equals])] = String(assignment[assignment.index(after: equals)...]).trimmingCharacters(in: CharacterSet(charactersIn: "'"))
        }
        values["TALLY_OPS_ADDRESS"] = "127.0.0.1:0"
        return values
    }

    func testTheStackKeepsItsStateAcrossRestartsAndKills() throws {
        try stack("up")
        let env = try stackEnvironment()
        func tally(_ arguments: [String]) throws -> String {
            let (status, output) = try ChildProcess.run(TestStack.executable("tally"), arguments, environment: env)
            XCTAssertEqual(status, 0, "tally \(arguments): \(output)")
            return output
        }
        func sql(_ query: String) throws -> String {
            let (status, output) = try ChildProcess.run("/usr/bin/env", ["psql", try XCTUnwrap(env["TALLY_DATABASE_URL"]), "-Atc", query], environment: env)
            XCTAssertEqual(status, 0, output)
            return output.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        // Configuration that is not in the log: a key, a price book, a customer's settings.
        let key = try XCTUnwrap(try tally(["keys", "create", "--name", "durable", "--grants"]).split(separator: "\n").first { $0.hasPrefix("tally_") })
        let book = directory + "/prices.yaml"
        try """
            book: default
            effective_from: 2026-01-01T00:00:00Z
            currency: USD
            models:
              - { model: durable-model, input: "2.00", output: "0" }
            """.write(toFile: book, atomically: true, encoding: .utf8)
        _ = try tally(["pricing", "apply", book])
        _ = try tally(["customers", "set", "durable-cust", "--overage", "allow", "--overage-limit", "100"])

        var processes: [ChildProcess] = []
        func startServices() throws -> String {
            let ingest = try ChildProcess(TestStack.executable("tally-ingest"), ["--port", "0", "--host", "127.0.0.1"], environment: env)
            processes += [ingest, try ChildProcess(TestStack.executable("tally-aggregator"), [], environment: env),
                          try ChildProcess(TestStack.executable("tally-rater"), [], environment: env)]
            return try ingest.listeningURL()
        }
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        func events(_ ids: ClosedRange<Int>) -> String {
            "[" + ids.map { index in
                String(decoding: EventEncoder.encode(UsageEvent(id: "durable-\(index)", source: "app://durable", subject: "durable-cust",
                                                                time: EventTime(microseconds: now - 60_000_000), model: "durable-model",
                                                                inputTokens: 1000, outputTokens: 0)), as: UTF8.self)
            }.joined(separator: ",") + "]"
        }
        /// Waits until the windows count `events` and durable-cust's balance is `balanceNanos`.
        func waitUntilCounted(events: String, balanceNanos: String, line: UInt = #line) throws {
            XCTAssertTrue(try TestStack.eventually {
                try sql("SELECT coalesce(sum(event_count), 0) FROM tally.usage_monthly") == events
                    && sql("SELECT balance_nanos FROM tally.wallets WHERE customer_id = 'durable-cust'") == balanceNanos
            }, processes.map(\.log).joined().suffix(3000).description, line: line)
        }
        var base = try startServices()
        let grant = try http("POST", base + "/v1/wallets/durable-cust/grants", body: #"{"id":"g-durable","amount":"10.00","currency":"USD","source":"purchase"}"#,
                             authorization: "Bearer \(key)")
        XCTAssertEqual(grant.status, 202, grant.body)
        let sent = try http("POST", base + "/v1/events", body: events(1...200), authorization: "Bearer \(key)")
        XCTAssertEqual(sent.status, 202, sent.body)
        // 200 events of 1,000 input tokens at 2.00 per million: 0.40 charged of the 10.00 granted.
        try waitUntilCounted(events: "200", balanceNanos: "9600000000")
        let period = String(EventTime.format(microseconds: now - 60_000_000).prefix(7))
        _ = try tally(["invoices", "close", "--customer", "durable-cust", "--period", period, "--force"])

        let stateQuery = """
            SELECT concat_ws(' | ',
              (SELECT count(*) FROM tally.api_keys), (SELECT string_agg(book_name || ' v' || version, ',' ORDER BY book_name, version) FROM tally.price_books),
              (SELECT string_agg(customer_id, ',' ORDER BY customer_id) FROM tally.customers),
              (SELECT string_agg(invoice_id || '=' || total_due_nanos, ',' ORDER BY invoice_id) FROM tally.invoices),
              (SELECT sum(event_count) FROM tally.usage_monthly), (SELECT balance_nanos FROM tally.wallets WHERE customer_id = 'durable-cust'),
              (SELECT string_agg(consumer_group || ':' || partition || ':' || next_offset, ',' ORDER BY consumer_group, partition) FROM tally.consumer_offsets))
            """
        let before = try sql(stateQuery)
        XCTAssertTrue(before.contains("| 200 | 9600000000 |"), before)

        // What a laptop reboot does; `down` stops the services of this stack first.
        try stack("down")
        for process in processes { XCTAssertNotNil(process.wait(timeout: .seconds(5)), "stopped by stack down") }
        processes.removeAll()
        try stack("up")
        XCTAssertEqual(try sql(stateQuery), before, "after stack down and up")
        XCTAssertTrue(try tally(["reconcile"]).contains("recounted 201 records"), "the log kept every record: 200 events and the grant")

        // kill -9 of the broker and of its storage server.
        try stack("broker-kill")
        try stack("s3-kill")
        try stack("up")
        XCTAssertEqual(try sql(stateQuery), before, "after kill -9 of the broker and the S3 server")
        XCTAssertTrue(try tally(["reconcile"]).contains("0 mismatches"))

        // New events after the restarts count once; the old ones sent again are duplicates.
        base = try startServices()
        let more = try http("POST", base + "/v1/events", body: events(181...250), authorization: "Bearer \(key)")
        XCTAssertEqual(more.status, 202, more.body)
        try waitUntilCounted(events: "250", balanceNanos: "9500000000")
        let reconcile = try tally(["reconcile"])
        XCTAssertTrue(reconcile.contains("0 mismatches"), reconcile)

        // kill -9 of the broker, then of its storage, while events arrive and both consumers read.
        // The application sends again what was not acknowledged (here: all of it, the same ids).
        // A batch the broker acknowledged and then lost (a known limit of Tansu on S3) is either
        // sent again, or, if the consumers had counted it, named by `tally check-log` and kept.
        let answered = AnsweredRequests()
        let bodies = stride(from: 251, through: 441, by: 10).map { events($0...($0 + 9)) }
        let (url, authorization) = (base + "/v1/events", "Bearer \(key)")
        let sender = Thread {
            for body in bodies { answered.add((try? http("POST", url, body: body, authorization: authorization))?.status ?? 0) }
        }
        sender.start()
        XCTAssertTrue(try TestStack.eventually { answered.count >= 5 })
        try stack("broker-kill")
        try stack("up")
        XCTAssertTrue(try TestStack.eventually { answered.count >= 12 })
        try stack("s3-kill")
        try stack("up")
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(120)) { answered.count == 20 }, "every request is answered")
        let resent = try http("POST", base + "/v1/events", body: events(251...450), authorization: "Bearer \(key)")
        XCTAssertEqual(resent.status, 202, resent.body)
        let (logStatus, logReport) = try ChildProcess.run(TestStack.executable("tally"), ["check-log"], environment: env)
        if logStatus == 1 {
            // The consumers stop, keep what they counted, and start again from the log end.
            for process in processes.dropFirst() { process.signal(SIGTERM); _ = process.wait(timeout: .seconds(30)) }
            XCTAssertTrue(try tally(["check-log", "--keep"]).contains("kept what was counted"))
            processes += [try ChildProcess(TestStack.executable("tally-aggregator"), [], environment: env),
                          try ChildProcess(TestStack.executable("tally-rater"), [], environment: env)]
            _ = try http("POST", base + "/v1/events", body: events(251...450), authorization: "Bearer \(key)")
        } else {
            XCTAssertEqual(logStatus, 0, logReport)
        }
        try waitUntilCounted(events: "450", balanceNanos: "9100000000")
        if logStatus == 0 { XCTAssertTrue(try tally(["reconcile"]).contains("0 mismatches")) }
        for process in processes { process.signal(SIGTERM); _ = process.wait(timeout: .seconds(30)) }

        // The memory engine starts an empty log: the stack says so and drops nothing.
        let counted = try sql(stateQuery)
        try stack("down")
        environment["TALLY_BROKER_STORAGE"] = "memory"
        let memory = try stack("up")
        XCTAssertTrue(memory.contains("no longer holds everything the consumers counted") && memory.contains("Nothing was changed")
                      && memory.contains("tally check-log --keep"), memory)
        XCTAssertEqual(try sql(stateQuery), counted)
        // Rebuilding from the new log would bill the issued invoice's credits again: refused.
        let (refused, refusal) = try ChildProcess.run("/bin/bash", [TestStack.root.appendingPathComponent("scripts/stack").path, "reset-derived"],
                                                      environment: environment)
        XCTAssertNotEqual(refused, 0)
        XCTAssertTrue(refusal.contains("issued invoices"), refusal)
        _ = try sql("DELETE FROM tally.invoice_lines; DELETE FROM tally.invoices")
        try stack("reset-derived")
        XCTAssertEqual(try sql("""
            SELECT concat_ws(' | ', (SELECT count(*) FROM tally.api_keys), (SELECT count(*) FROM tally.price_books),
              (SELECT count(*) FROM tally.customers), (SELECT count(*) FROM tally.usage_windows_hourly), (SELECT count(*) FROM tally.wallets),
              (SELECT count(*) FROM tally.consumer_offsets), (SELECT count(*) FROM tally.unsigned_credit_horizon))
            """), "1 | 1 | 1 | 0 | 0 | 0 | 0", "configuration kept, derived state and the old log's horizon dropped")
    }

    /// `scripts/demo` twice in a row on one stack: the second run adds to the first.
    func testTheDemoTwiceAddsToTheFirstRun() throws {
        environment["DEMO_EVENTS"] = "2000"
        environment["DEMO_INGEST_PORT"] = "18480"
        func demo() throws {
            let (status, output) = try ChildProcess.run("/bin/bash", [TestStack.root.appendingPathComponent("scripts/demo").path], environment: environment)
            XCTAssertEqual(status, 0, output)
        }
        try demo()
        let env = try stackEnvironment()
        func state() throws -> [Int] {
            let query = """
                SELECT concat_ws(' ', (SELECT count(*) FROM tally.usage_event_keys), (SELECT sum(event_count) FROM tally.usage_monthly),
                  (SELECT count(*) FROM tally.rater_event_keys), (SELECT count(*) FROM tally.wallet_grants), (SELECT count(*) FROM tally.api_keys),
                  (SELECT count(*) FROM tally.dead_letters))
                """
            let (status, output) = try ChildProcess.run("/usr/bin/env", ["psql", try XCTUnwrap(env["TALLY_DATABASE_URL"]), "-Atc", query], environment: env)
            XCTAssertEqual(status, 0, output)
            return output.split(whereSeparator: \.isWhitespace).compactMap { Int($0) }
        }
        // A run: 2,000 distinct load-generator events and one Anthropic usage object, counted by
        // both consumers; its gateway call comes after they ran, so the next run counts it. The
        // rater adds the run's two grants; the run makes four keys; each consumer sets the three
        // poison records aside.
        XCTAssertEqual(try state(), [2001, 2001, 2001 + 2, 2, 4, 6])
        func invoices() throws -> Set<String> {
            let (status, output) = try ChildProcess.run("/usr/bin/env", ["psql", try XCTUnwrap(env["TALLY_DATABASE_URL"]), "-Atc",
                                                                         "SELECT invoice_id || '=' || total_due_nanos FROM tally.invoices"], environment: env)
            XCTAssertEqual(status, 0, output)
            return Set(output.split(separator: "\n").map(String.init))
        }
        let firstInvoices = try invoices()
        XCTAssertTrue(firstInvoices.contains { $0.hasPrefix("INV-") && $0.contains("-cust-0-USD=") }, "\(firstInvoices)")
        try demo()
        XCTAssertEqual(try state(), [4003, 4003, 4003 + 4, 4, 8, 12])
        // The month's invoices stay as the first run closed them (the second run's usage goes on
        // the next invoice as late usage; a customer first seen in the second run gets one of its own).
        XCTAssertTrue(firstInvoices.isSubset(of: try invoices()))
        let (status, reconcile) = try ChildProcess.run(TestStack.executable("tally"), ["reconcile"], environment: env)
        XCTAssertEqual(status, 0, reconcile)
    }
}

/// Statuses of HTTP requests made on another thread.
final class AnsweredRequests: @unchecked Sendable {
    private let lock = NSLock()
    private var statuses: [Int] = []
    func add(_ status: Int) { lock.withLock { statuses.append(status) } }
    var count: Int { lock.withLock { statuses.count } }
}
