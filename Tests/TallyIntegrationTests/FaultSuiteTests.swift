import Foundation
import TallyCore
import TallyKafka
import XCTest

/// The fault-injection suite (scripts/faults; `--large` for the bigger run): each row runs the real
/// stack, injects its fault while the generator publishes, then checks every invariant against
/// the generator's record. The table of rows is printed when the class finishes.
final class FaultSuiteTests: XCTestCase {
    struct Row {
        let fault: String
        let injections: Int
        let report: FaultRig.Report
        let recovery: [Duration]
    }

    nonisolated(unsafe) static var rows: [Row] = []

    override class func tearDown() {
        guard !rows.isEmpty else { return }
        func milliseconds(_ values: [Duration], _ quantile: Double) -> String {
            guard !values.isEmpty else { return "–" }
            let sorted = values.sorted()
            // Nearest rank.
            let rank = max(1, Int((Double(sorted.count) * quantile).rounded(.up)))
            return "\(sorted[rank - 1].totalMilliseconds) ms"
        }
        var table = "| fault | injections | events | lost | double-counted | recovery p50 | recovery p99 | invariants |\n"
        table += "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        for row in rows {
            table += "| \(row.fault) | \(row.injections) | \(row.report.events) | \(row.report.lost) | \(row.report.doubleCounted) "
                + "| \(milliseconds(row.recovery, 0.5)) | \(milliseconds(row.recovery, 0.99)) "
                + "| \(row.report.failures.isEmpty ? "all hold" : row.report.failures.joined(separator: "; ")) |\n"
        }
        print("\nfault suite (\(FaultScale.isLarge ? "large" : "CI size")):\n" + table)
        try? table.write(toFile: TestStack.root.appendingPathComponent(".tally/fault-table.md").path, atomically: true, encoding: .utf8)
    }

    /// Settles, checks, records the row and fails the test on any broken invariant.
    func finish(_ rig: FaultRig, _ fault: String, file: StaticString = #filePath, line: UInt = #line) async throws {
        await rig.stopGenerating()
        XCTAssertTrue(try rig.waitSettled(), "not settled:\n\((rig.aggregators + rig.raters).map { $0.log.suffix(1500) }.joined(separator: "\n"))",
                      file: file, line: line)
        let report = try rig.check()
        Self.rows.append(Row(fault: fault, injections: rig.injections, report: report, recovery: rig.recoveryTimes()))
        XCTAssertEqual(report.failures, [], fault, file: file, line: line)
    }

    func pause(_ range: ClosedRange<Double>) async throws {
        try await Task.sleep(for: .milliseconds(Int(Double.random(in: range) * 1000)))
    }

    /// Lets the groups join and the stream start before the first fault.
    func started(_ rig: FaultRig, seed: UInt64) async throws {
        rig.startGenerating(seed: seed)
        XCTAssertTrue(TestStack.eventually(timeout: .seconds(30)) {
            rig.monitor.firstCommit(group: rig.aggregatorGroup, after: .now - .seconds(60)) != nil
                && rig.monitor.firstCommit(group: rig.raterGroup, after: .now - .seconds(60)) != nil
        })
    }

    // MARK: Rows

    func testRow01KillNineTheAggregator() async throws {
        try await killNine("kill -9 tally-aggregator at random moments", seed: 801) { $0.aggregators[0] }
    }

    func testRow02KillNineTheRater() async throws {
        try await killNine("kill -9 tally-rater at random moments", seed: 802) { $0.raters[0] }
    }

    func killNine(_ name: String, seed: UInt64, victim: (FaultRig) -> ChildProcess) async throws {
        let rig = try FaultRig.running()
        try await started(rig, seed: seed)
        for _ in 0..<FaultScale.pick(ci: 2, large: 8) {
            try await pause(1.0...3.0)
            let process = victim(rig)
            process.signal(SIGKILL)
            rig.fault([rig.aggregators.contains { $0 === process } ? rig.aggregatorGroup : rig.raterGroup])
            _ = try rig.restart(process)
        }
        try await pause(3.0...3.0)
        try await finish(rig, name)
    }

    /// Each consumer kills itself right after its n-th PostgreSQL commit returns, n random.
    func testRow03KillNineRightAfterTheCommit() async throws {
        let rig = try FaultRig()
        func knob() -> [String: String] { ["TALLY_FAULT_KILL_AFTER_COMMITS": String(Int.random(in: 2...6))] }
        try rig.startAggregator(knob())
        try rig.startRater(knob())
        rig.startGenerating(seed: 803)
        var remaining = FaultScale.pick(ci: 4, large: 16)
        let deadline = ContinuousClock.now + .seconds(FaultScale.pick(ci: 90, large: 300))
        while remaining > 0 && ContinuousClock.now < deadline {
            for process in rig.aggregators + rig.raters where process.wait(timeout: .zero) != nil {
                rig.fault([rig.aggregators.contains { $0 === process } ? rig.aggregatorGroup : rig.raterGroup])
                remaining -= 1
                // The last restart runs without the knob, so the row can settle.
                _ = try rig.restart(process, environment: remaining > 1 ? knob() : [:])
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        XCTAssertEqual(remaining, 0, "the consumers did not kill themselves often enough")
        try await pause(3.0...3.0)
        try await finish(rig, "kill -9 right after a PostgreSQL commit")
    }

    func testRow04PostgresImmediateStop() async throws {
        try await stackFault("PostgreSQL stopped (immediate) mid-batch, restarted", seed: 804, injections: FaultScale.pick(ci: 1, large: 3),
                             down: "pg-stop", up: "pg-start", downtime: 2.0...3.0)
    }

    func testRow05BrokerPaused() async throws {
        try await stackFault("broker paused (SIGSTOP/SIGCONT) while producing and consuming", seed: 805, injections: FaultScale.pick(ci: 1, large: 3),
                             down: "broker-pause", up: "broker-resume", downtime: 3.0...4.0)
    }

    /// Takes a part of the stack away (scripts/stack `down`) mid-stream and brings it back (`up`).
    func stackFault(_ name: String, seed: UInt64, injections: Int, down: String, up: String, downtime: ClosedRange<Double>) async throws {
        let rig = try FaultRig.running()
        try await started(rig, seed: seed)
        for _ in 0..<injections {
            try await pause(1.0...2.0)
            // Noted first: once PostgreSQL is down, the monitor cannot see the last commits before it.
            let fault = rig.fault([rig.aggregatorGroup, rig.raterGroup])
            try TestStack.stack(down)
            try await pause(downtime)
            try TestStack.stack(up)
            rig.faultEnded(fault)
        }
        try await pause(4.0...4.0)
        try await finish(rig, name)
    }

    /// One instance of each consumer is stopped past its session timeout, another takes over,
    /// then the stopped one resumes with a batch in hand: it must not commit.
    func testRow06Zombies() async throws {
        let rig = try FaultRig()
        let slow = ["TALLY_FAULT_COMMIT_DELAY_MS": "1500"]
        let zombies = [try rig.startAggregator(slow), try rig.startRater(slow)]
        try rig.startAggregator()
        try rig.startRater()
        try await started(rig, seed: 806)
        for _ in 0..<FaultScale.pick(ci: 1, large: 2) {
            try await pause(1.0...2.0)
            zombies.forEach { $0.signal(SIGSTOP) }
            rig.fault([rig.aggregatorGroup, rig.raterGroup])
            // Past the 6 s session timeout, and the survivors take the partitions over.
            try await pause(10.0...10.0)
            zombies.forEach { $0.signal(SIGCONT) }
        }
        try await pause(4.0...4.0)
        try await finish(rig, "zombie: SIGSTOP past the session timeout, another instance takes over, SIGCONT")
    }

    func testRow07RebalanceStorm() async throws {
        let rig = try FaultRig.running()
        try await started(rig, seed: 807)
        var extras: [ChildProcess] = []
        for step in 0..<FaultScale.pick(ci: 6, large: 24) {
            try await pause(2.0...3.0)
            if step % 3 == 2, !extras.isEmpty {
                let leaving = extras.removeFirst()
                let group = rig.aggregators.contains { $0 === leaving } ? rig.aggregatorGroup : rig.raterGroup
                rig.stop(leaving)
                rig.fault([group])
            } else {
                extras.append(step % 2 == 0 ? try rig.startAggregator() : try rig.startRater())
                rig.fault([step % 2 == 0 ? rig.aggregatorGroup : rig.raterGroup])
            }
        }
        try await pause(6.0...6.0)
        try await finish(rig, "rebalance storm: instances join and leave every 2–3 s")
    }

    /// Acknowledged events re-sent later, some with the same payload, some with another.
    func testRow08SameIdsResent() async throws {
        let rig = try FaultRig.running()
        var generator = LoadGenerator(seed: 808, customers: 20, duplicateRate: 0, startMicroseconds: 1_793_491_200_000_000,
                                      spacingMicroseconds: 1_000_000, idPrefix: "r")
        let events = (0..<FaultScale.pick(ci: 4000, large: 40_000)).map { _ in generator.next().event }
        await rig.send(events)
        try await pause(1.0...1.0)
        let again = events.enumerated().filter { $0.offset % 10 == 0 }.map(\.element)
        let changed = events.enumerated().filter { $0.offset % 50 == 7 }.map { entry -> UsageEvent in
            var event = entry.element
            event.outputTokens += 100
            return event
        }
        await rig.send(again + changed)
        rig.countInjections(again.count + changed.count)
        try await finish(rig, "the same ids re-sent later, same and different payload")
        let conflicts = try rig.harness.connection.query("SELECT count(*) FROM tally.event_conflicts WHERE consumer_group = $1", [rig.aggregatorGroup])
        XCTAssertEqual(try conflicts.int64(0, 0) ?? 0, Int64(changed.count))
    }

    func testRow09PoisonRecordsStraightIntoTheTopic() async throws {
        let rig = try FaultRig.running()
        let count = 10_000
        var generator = LoadGenerator(seed: 809, customers: 20, duplicateRate: 0, startMicroseconds: 1_793_491_200_000_000,
                                      spacingMicroseconds: 1_000_000, idPrefix: "p")
        let kinds: [[UInt8]] = [
            Array("{not json".utf8), [0xff, 0xfe, 0x00],
            Array(#"{"specversion":"1.0","id":"x","source":"s","type":"llm.usage","subject":"c","time":"2026-11-01T00:00:00Z","data":{"model":"m","input_tokens":-1,"output_tokens":1}}"#.utf8),
            Array(#"{"specversion":"1.0","id":"x","source":"s","type":"llm.other","subject":"c","time":"2026-11-01T00:00:00Z","data":{}}"#.utf8),
            Array(#"{"specversion":"1.0","id":"x","type":"llm.usage"}"#.utf8), [],
        ]
        for batch in 0..<10 {
            let events = (0..<400).map { _ in generator.next().event }
            await rig.send(events)
            await rig.sendPoison((0..<count / 10).map { index in ("c-\(index % 20)", kinds[(batch + index) % kinds.count]) })
        }
        rig.countInjections(count)
        try await finish(rig, "10k malformed and schema-invalid records written straight to the topic")
    }

    /// Bad input over HTTP: every answer is a 4xx, nothing of it is counted.
    func testRow10BadInputOverHTTP() async throws {
        let rig = try FaultRig.running(ingest: true)
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        func event(_ index: Int) -> UsageEvent {
            UsageEvent(id: "bad-\(index)", source: "faults", subject: "fc-\(index % 10)", time: EventTime(microseconds: now - 60_000_000),
                       model: "gpt-4o", inputTokens: Int64(index % 97), outputTokens: 5)
        }
        func text(_ event: UsageEvent) -> String { String(decoding: EventEncoder.encode(event), as: UTF8.self) }
        let good = text(event(0))
        let bad: [String] = [
            good.replacingOccurrences(of: #""input_tokens":0"#, with: #""input_tokens":-5"#),
            good.replacingOccurrences(of: #""input_tokens":0"#, with: #""input_tokens":9007199254740993"#),
            good.replacingOccurrences(of: #""input_tokens":0"#, with: #""input_tokens":1.5"#),
            good.replacingOccurrences(of: #""input_tokens":0"#, with: #""input_tokens":"12""#),
            good.replacingOccurrences(of: #""input_tokens":0"#, with: #""input_tokens":1e400"#),
            good.replacingOccurrences(of: #""subject":"fc-0""#, with: "\"subject\":\"\(String(repeating: "x", count: 5000))\""),
            good.replacingOccurrences(of: #""model":"gpt-4o""#, with: "\"model\":\"\(String(repeating: "m", count: 100_000))\""),
            "{" + String(repeating: " ", count: 1 << 20) + "}",
            String(repeating: "[", count: 100_000),
            "\u{0}\u{1}binary",
        ]
        var injected = 0
        for round in 0..<FaultScale.pick(ci: 5, large: 50) {
            let valid = (0..<100).map { event(round * 100 + $0 + 1) }
            try rig.post(valid.map(text).joined(separator: "\n"), events: valid)
            for body in bad {
                let response = try rig.post(body, contentType: "application/json")
                XCTAssertTrue((400..<500).contains(response.status), "\(response.status) for \(body.prefix(80)): \(response.body.prefix(300))")
                injected += 1
            }
        }
        rig.countInjections(injected)
        try await finish(rig, "negative, huge, fractional, non-numeric counts; 1 MiB bodies; oversize fields (HTTP)")
    }

    /// Quotes, SQL metacharacters, NUL, right-to-left text and emoji in customer ids and properties.
    func testRow11HostileText() async throws {
        let rig = try FaultRig.running(ingest: true)
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        let customers = ["O'Brien \"quoted\"", "x'); DROP TABLE tally.usage_event_keys; --", "nul\u{0}inside", "\u{202E}gnp.exe",
                         "🦙 llama-co 👩‍👩‍👧", "back\\slash\ttab", "%_like_%", "מלקוח"]
        var events: [UsageEvent] = []
        // Customers interleaved, so each request mixes valid and refused events.
        for number in 0..<FaultScale.pick(ci: 50, large: 500) {
            for (index, customer) in customers.enumerated() {
                events.append(UsageEvent(id: "h-\(index)-\(number)'\"", source: "faults", subject: customer, time: EventTime(microseconds: now - 60_000_000),
                                         model: "claude-sonnet-4", inputTokens: Int64(100 + number), outputTokens: 7,
                                         properties: ["note": customer, "sql": "'; SELECT pg_sleep(10); --"]))
            }
        }
        // Ids with control characters (NUL, tab) are invalid by the schema: the API refuses them (4xx)
        // and, written straight into the topic, they are poison. The rest must count exactly.
        func hasControl(_ event: UsageEvent) -> Bool { event.subject.utf8.contains { $0 < 0x20 || $0 == 0x7f } }
        let viaAPI = events.enumerated().filter { $0.offset % 2 == 0 }.map(\.element)
        for chunk in stride(from: 0, to: viaAPI.count, by: 100) {
            let part = Array(viaAPI[chunk..<min(viaAPI.count, chunk + 100)])
            let response = try rig.post(part.map { String(decoding: EventEncoder.encode($0), as: UTF8.self) }.joined(separator: "\n"), events: part)
            let refused = response.body.components(separatedBy: #""status":"rejected""#).count - 1
            XCTAssertEqual(refused, part.filter(hasControl).count, response.body)
            XCTAssertEqual(response.status, refused == part.count ? 400 : 202, response.body)
        }
        let straight = events.enumerated().filter { $0.offset % 2 == 1 }.map(\.element)
        await rig.send(straight.filter { !hasControl($0) })
        await rig.sendPoison(straight.filter(hasControl).map { ($0.subject, EventEncoder.encode($0)) })
        rig.countInjections(events.count)
        try await finish(rig, "quotes, SQL metacharacters, NUL, right-to-left text, emoji in ids and properties")
    }

    /// Grants and usage arrive together for small wallets; grants re-sent credit once.
    func testRow12GrantsAndUsageOnSmallWallets() async throws {
        let rig = try FaultRig.running()
        try await started(rig, seed: 812)
        var grants: [GrantEvent] = []
        for round in 0..<FaultScale.pick(ci: 20, large: 200) {
            let batch = (0..<5).map { customer in
                GrantEvent(id: "grant-\(round)-\(customer)", source: "faults", subject: "fc-cust-\(customer)",
                           time: EventTime("2026-10-30T00:00:00Z")!, amountNanos: Int64.random(in: 1...50_000_000), currency: Currency("USD")!,
                           priority: Int64.random(in: 1...3))
            }
            grants += batch
            // Each grant twice, the copy a little later: it must credit once.
            await rig.sendGrants(batch + batch.filter { _ in Bool.random() })
            try await Task.sleep(for: .milliseconds(100))
        }
        rig.countInjections(grants.count)
        try await finish(rig, "concurrent grants (some re-sent) and usage on small wallets")
        let overdrawn = try rig.harness.connection.query("SELECT count(*) FROM tally.wallets WHERE balance_nanos < 0").int64(0, 0) ?? 0
        XCTAssertGreaterThan(overdrawn, 0, "the wallets were meant to run out")
    }

    // MARK: The suite cannot pass vacuously

    /// Each invariant, broken on purpose in a debug build (TALLY_DEBUG_BREAK), is caught by its check.
    func testEachInvariantCheckCatchesItsDeliberateBreak() async throws {
        #if !DEBUG
        throw XCTSkip("the deliberate breaks exist in debug builds only")
        #endif
        let cases: [(break: String, expect: String)] = [
            ("dedup", "double-counted"), ("drop", "lost"), ("phantom", "phantom"), ("dead-letters", "dead letters"),
            ("wallet", "wallet"), ("fencing", "offsets"), ("server-errors", "server errors"),
        ]
        for (broken, expected) in cases {
            let rig = try FaultRig.running(breaking: [broken])
            var generator = LoadGenerator(seed: 899, customers: 10, duplicateRate: 0, startMicroseconds: 1_793_491_200_000_000,
                                          spacingMicroseconds: 1_000_000, idPrefix: "b")
            let events = (0..<1500).map { _ in generator.next().event }
            switch broken {
            case "dead-letters":
                await rig.send(events)
                await rig.sendPoison([("c", Array("{nope".utf8))])
            case "wallet":
                await rig.sendGrants([GrantEvent(id: "g", source: "faults", subject: events[0].subject, time: EventTime("2026-10-30T00:00:00Z")!,
                                                 amountNanos: 5_000_000_000, currency: Currency("USD")!, priority: 1)])
                await rig.send(events)
            case "fencing":
                // A zombie with a batch in hand, resumed after another instance took over.
                let zombie = try rig.startAggregator(["TALLY_FAULT_COMMIT_DELAY_MS": "2000"])
                rig.startGenerating(seed: 898)
                try await Task.sleep(for: .seconds(8))
                zombie.signal(SIGSTOP)
                try await Task.sleep(for: .seconds(10))
                zombie.signal(SIGCONT)
                try await Task.sleep(for: .seconds(4))
                await rig.stopGenerating()
            case "server-errors":
                try rig.startIngest()
                await rig.send(events)
                try rig.post(#"{"specversion":"1.0"}"#, contentType: "application/json")
            default:
                await rig.send(events)
                if broken == "dedup" { await rig.send(Array(events.prefix(200))) }
            }
            XCTAssertTrue(try rig.waitSettled(timeout: .seconds(90)), broken)
            let report = try rig.check(replay: broken == "dedup")
            XCTAssertTrue(report.failures.contains { $0.hasPrefix(expected) }, "breaking \(broken) was not caught: \(report.failures)")
            if broken == "dedup" {
                XCTAssertTrue(report.failures.contains { $0.hasPrefix("replay") }, "the replay (unbroken code) must disagree: \(report.failures)")
            }
        }
    }
}
