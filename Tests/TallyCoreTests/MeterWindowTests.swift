import TallyCore
import XCTest

/// Meter windows: the catalog's validation, each aggregation on hand-computed examples, and the
/// property that any batching and any merge order give the same windows, equal to an independent
/// recount.
final class MeterWindowTests: XCTestCase {
    let catalog = MeterCatalog([
        MeterDefinition(name: "web_searches", unit: "request", aggregation: .sum, dimensions: ["team"]),
        MeterDefinition(name: "tool_calls", unit: "call", aggregation: .count),
        MeterDefinition(name: "peak_context", unit: "token", aggregation: .max),
        MeterDefinition(name: "seats", unit: "seat", aggregation: .latest),
        MeterDefinition(name: "end_users", unit: "user", aggregation: .uniqueCount(property: "end_user")),
    ])

    /// 2026-11-02T00:00:00Z plus hours and minutes, in microseconds.
    func at(day: Int64 = 0, hour: Int64, minute: Int64 = 0) -> Int64 {
        1_793_577_600_000_000 + day * 86_400_000_000 + hour * 3_600_000_000 + minute * 60_000_000
    }

    var offset: Int64 = 0
    func reading(_ meter: String, _ time: Int64, quantity: Int64 = 1, customer: String = "c1", _ properties: [String: String] = [:]) -> MeterReading {
        offset += 1
        return MeterReading(meter: meter, customerID: customer, time: time, position: LogPosition(partition: 0, offset: offset),
                            quantity: quantity, properties: properties)
    }

    func figure(_ windows: [MeterWindowKey: MeterWindowValue], _ meter: String, _ granularity: Granularity, _ start: Int64,
                customer: String = "c1", dimensions: [String] = []) -> Int128? {
        windows[MeterWindowKey(meter: meter, customerID: customer, granularity: granularity, start: granularity.windowStart(start), dimensions: dimensions)]?.result
    }

    func testEachAggregationOnHandComputedWindows() {
        let readings = [
            // End users: hour 10 {a, b}, hour 11 {b, c}, the next day's hour 9 {a, d}.
            reading("end_users", at(hour: 10), ["end_user": "a"]), reading("end_users", at(hour: 10, minute: 5), ["end_user": "b"]),
            reading("end_users", at(hour: 11), ["end_user": "b"]), reading("end_users", at(hour: 11, minute: 30), ["end_user": "c"]),
            reading("end_users", at(day: 1, hour: 9), ["end_user": "a"]), reading("end_users", at(day: 1, hour: 9, minute: 1), ["end_user": "d"]),
            reading("end_users", at(day: 1, hour: 9, minute: 2)),  // no end user: adds nothing
            // Peak context: 5 and 9 on the first day, 3 on the next.
            reading("peak_context", at(hour: 10), quantity: 5), reading("peak_context", at(hour: 11), quantity: 9),
            reading("peak_context", at(day: 1, hour: 9), quantity: 3),
            // Seats: read in log order 7 (at 11:30), then 4 (at 10:15, earlier in event time).
            reading("seats", at(hour: 11, minute: 30), quantity: 7), reading("seats", at(hour: 10, minute: 15), quantity: 4),
            // Web searches by team; tool calls count readings, not quantities.
            reading("web_searches", at(hour: 10), quantity: 3, ["team": "search"]), reading("web_searches", at(hour: 10), quantity: 2, ["team": "search"]),
            reading("web_searches", at(hour: 10), quantity: 4, ["team": "ads"]), reading("web_searches", at(hour: 10), quantity: 1),
            reading("tool_calls", at(hour: 10), quantity: 50), reading("tool_calls", at(hour: 12), quantity: 0),
            reading("not_declared", at(hour: 10), quantity: 8),
        ]
        let windows = MeterWindows.fold(readings, catalog: catalog)
        XCTAssertEqual(figure(windows, "end_users", .hour, at(hour: 10)), 2)
        XCTAssertEqual(figure(windows, "end_users", .hour, at(hour: 11)), 2)
        XCTAssertEqual(figure(windows, "end_users", .day, at(hour: 0)), 3, "a, b, c: not 2 + 2")
        XCTAssertEqual(figure(windows, "end_users", .day, at(day: 1, hour: 0)), 2)
        XCTAssertEqual(figure(windows, "end_users", .month, at(hour: 0)), 4, "a, b, c, d: not 3 + 2")
        XCTAssertEqual(figure(windows, "peak_context", .day, at(hour: 0)), 9)
        XCTAssertEqual(figure(windows, "peak_context", .day, at(day: 1, hour: 0)), 3)
        XCTAssertEqual(figure(windows, "peak_context", .month, at(hour: 0)), 9)
        XCTAssertEqual(figure(windows, "seats", .hour, at(hour: 10)), 4)
        XCTAssertEqual(figure(windows, "seats", .day, at(hour: 0)), 7, "the latest by event time, though read first")
        XCTAssertEqual(figure(windows, "web_searches", .hour, at(hour: 10), dimensions: ["search"]), 5)
        XCTAssertEqual(figure(windows, "web_searches", .hour, at(hour: 10), dimensions: ["ads"]), 4)
        XCTAssertEqual(figure(windows, "web_searches", .day, at(hour: 0), dimensions: [""]), 1, "no team: its own window")
        XCTAssertEqual(figure(windows, "tool_calls", .day, at(hour: 0)), 2)
        XCTAssertNil(figure(windows, "not_declared", .hour, at(hour: 10)))
        XCTAssertEqual(windows.keys.filter { $0.meter == "end_users" }.count, 3 + 2 + 1)
    }

    /// Any split into batches, batches of different customers merged in any order, and readings
    /// of one customer in any order within the log: the same windows, equal to a recount that
    /// groups the readings and applies each aggregation directly.
    func testAnyBatchingGivesTheSameWindowsAsARecount() {
        var random = SeededGenerator(seed: 2026)
        let meters = Array(catalog.meters.keys).sorted() + ["not_declared"]
        for round in 0..<40 {
            let count = Int.random(in: 0...400, using: &random)
            let readings = (0..<count).map { index in
                MeterReading(meter: meters.randomElement(using: &random)!, customerID: "c\(Int.random(in: 0..<3, using: &random))",
                             // Across a month end: 2026-11-29 to 2026-12-02, extreme quantities included.
                             time: at(day: Int64.random(in: -4...0, using: &random) + 30, hour: Int64.random(in: 0..<24, using: &random),
                                      minute: Int64.random(in: 0..<60, using: &random)),
                             position: LogPosition(partition: Int32(round % 4), offset: Int64(index)),
                             quantity: [0, 1, 7, Int64.max, Int64.random(in: 0...1_000_000, using: &random)].randomElement(using: &random)!,
                             properties: [("end_user", ["u1", "u2", "u3", "u4"]), ("team", ["a", "b"])].reduce(into: [:]) { properties, pair in
                                 if Bool.random(using: &random) { properties[pair.0] = pair.1.randomElement(using: &random)! }
                             })
            }
            let whole = MeterWindows.fold(readings, catalog: catalog)
            XCTAssertEqual(whole, recount(readings), "round \(round)")
            // Split into batches at random points; merge the batches' windows in a random order.
            var cuts = Set((0..<Int.random(in: 0...8, using: &random)).map { _ in Int.random(in: 0...count, using: &random) })
            cuts.formUnion([0, count])
            let bounds = cuts.sorted()
            var batches = zip(bounds, bounds.dropFirst()).map { MeterWindows.fold(Array(readings[$0..<$1]), catalog: catalog) }
            batches.shuffle(using: &random)
            var merged: [MeterWindowKey: MeterWindowValue] = [:]
            for batch in batches { MeterWindows.merge(batch, into: &merged) }
            XCTAssertEqual(merged.mapValues(\.result), whole.mapValues(\.result), "round \(round): batches \(bounds)")
        }
    }

    /// The independent recount: group by window, then each aggregation straight from its definition.
    func recount(_ readings: [MeterReading]) -> [MeterWindowKey: MeterWindowValue] {
        var groups: [MeterWindowKey: [MeterReading]] = [:]
        for reading in readings {
            guard let meter = catalog.meters[reading.meter] else { continue }
            if case .uniqueCount(let property) = meter.aggregation, reading.properties[property] == nil { continue }
            for granularity in Granularity.allCases {
                groups[MeterWindowKey(meter: meter.name, customerID: reading.customerID, granularity: granularity,
                                      start: granularity.windowStart(reading.time), dimensions: meter.dimensions.map { reading.properties[$0] ?? "" }),
                       default: []].append(reading)
            }
        }
        return groups.reduce(into: [:]) { windows, group in
            let (key, members) = group
            switch catalog.meters[key.meter]!.aggregation {
            case .sum: windows[key] = .sum(members.reduce(0) { $0 + Int128($1.quantity) })
            case .count: windows[key] = .count(Int128(members.count))
            case .max: windows[key] = .max(members.map(\.quantity).max()!)
            case .latest:
                let last = members.max { ($0.time, $0.position) < ($1.time, $1.position) }!
                windows[key] = .latest(time: last.time, position: last.position, quantity: last.quantity)
            case .uniqueCount(let property): windows[key] = .unique(Set(members.compactMap { $0.properties[property].map(ExactText.init) }))
            }
        }
    }

    /// A new catalog may add meters and change units; it may not drop a meter or change how its
    /// stored windows were folded.
    func testANewCatalogKeepsEveryDeclaredMeterAsItWasFolded() {
        XCTAssertNil(catalog.refusal(following: catalog))
        var added = Array(catalog.meters.values)
        added.append(MeterDefinition(name: "images", unit: "image", aggregation: .sum))
        XCTAssertNil(MeterCatalog(added).refusal(following: catalog))
        let renamedUnit = catalog.meters.values.map { $0.name == "seats" ? MeterDefinition(name: "seats", unit: "licence", aggregation: .latest) : $0 }
        XCTAssertNil(MeterCatalog(renamedUnit).refusal(following: catalog), "the unit is a label")
        let dropped = catalog.meters.values.filter { $0.name != "tool_calls" }
        XCTAssertEqual(MeterCatalog(dropped).refusal(following: catalog), "meter tool_calls is missing: a declared meter stays declared")
        for changed in [MeterDefinition(name: "web_searches", unit: "request", aggregation: .max, dimensions: ["team"]),
                        MeterDefinition(name: "web_searches", unit: "request", aggregation: .sum, dimensions: ["team", "status"]),
                        MeterDefinition(name: "end_users", unit: "user", aggregation: .uniqueCount(property: "run_id"))] {
            let catalogNow = MeterCatalog(catalog.meters.values.map { $0.name == changed.name ? changed : $0 })
            XCTAssertEqual(catalogNow.refusal(following: catalog),
                           "meter \(changed.name) changes its aggregation or dimensions: declare a meter under a new name instead")
        }
    }

    func testTheCatalogIsReadAndEveryMistakeNamesItsField() throws {
        let catalog = try MeterCatalog.parse("""
            meters:
              - { name: web_search_requests, unit: request, aggregation: sum, dimensions: [team, status] }
              - name: active_end_users
                unit: user
                aggregation: unique_count
                property: end_user
            """)
        XCTAssertEqual(catalog.meters["web_search_requests"], MeterDefinition(name: "web_search_requests", unit: "request", aggregation: .sum, dimensions: ["team", "status"]))
        XCTAssertEqual(catalog.meters["active_end_users"]?.aggregation, .uniqueCount(property: "end_user"))
        let mistakes: [(String, path: String, line: Int)] = [
            ("meters: []", "meters", 1),
            ("meters:\n  - { name: a, unit: u, aggregation: avg }", "meters[0].aggregation", 2),
            ("meters:\n  - { name: a, unit: u, aggregation: unique_count }", "meters[0].property", 2),
            ("meters:\n  - { name: a, unit: u, aggregation: sum }\n  - { name: a, unit: v, aggregation: max }", "meters[1].name", 3),
            ("meters:\n  - { name: Web-Search, unit: u, aggregation: sum }", "meters[0].name", 2),
            ("meters:\n  - { name: a, unit: u, aggregation: sum, window: hour }", "meters[0].window", 2),
            ("meters:\n  - { name: a, aggregation: sum }", "meters[0].unit", 2),
            ("meters:\n  - { name: a, unit: u, aggregation: sum, dimensions: [t, t] }", "meters[0].dimensions[1]", 2),
            ("meters:\n  - { name: a, unit: u, aggregation: sum, dimensions: [a, b, c, d, e, f, g, h, i] }", "meters[0].dimensions", 2),
        ]
        for (text, path, line) in mistakes {
            XCTAssertThrowsError(try MeterCatalog.parse(text), text) { error in
                XCTAssertEqual((error as? ConfigError)?.path, path, "\(text): \(error)")
                XCTAssertEqual((error as? ConfigError)?.line, line, "\(text): \(error)")
            }
        }
    }

    /// What `tally meters apply` stores reads back to the same catalog, names with quotes included.
    func testTheCanonicalFormReadsBackToTheSameCatalog() throws {
        let catalog = MeterCatalog([
            MeterDefinition(name: "web_search_requests", unit: "request \"web\"", aggregation: .sum, dimensions: ["team", "status"]),
            MeterDefinition(name: "active_end_users", unit: "user", aggregation: .uniqueCount(property: "end_user")),
            MeterDefinition(name: "seats", unit: "seat", aggregation: .latest),
            MeterDefinition(name: "peak", unit: "token", aggregation: .max, dimensions: ["model"]),
            MeterDefinition(name: "calls", unit: "call", aggregation: .count),
        ])
        XCTAssertEqual(try MeterCatalog.parse(catalog.canonicalJSON), catalog)
        XCTAssertEqual(try MeterCatalog.parse(catalog.canonicalJSON).canonicalJSON, catalog.canonicalJSON)
    }

    /// An event's labels are dimensions too, and win over a property of the same name.
    func testReadingsCarryTheEventsLabelsAsProperties() {
        let event = UsageEvent(id: "e", source: "s", subject: "acme", time: EventTime(microseconds: 7), model: "gpt-4o", provider: "openai",
                               feature: "summaries", inputTokens: 1, outputTokens: 1, properties: ["feature": "spoofed", "team": "a"],
                               meters: ["b_meter": 2, "a_meter": 1])
        let readings = MeterReading.of(PositionedEvent(event: event, position: LogPosition(partition: 1, offset: 9)))
        XCTAssertEqual(readings.map(\.meter), ["a_meter", "b_meter"])
        XCTAssertEqual(readings[1].quantity, 2)
        XCTAssertEqual(readings[0].properties, ["feature": "summaries", "team": "a", "model": "gpt-4o", "provider": "openai"])
        XCTAssertEqual(readings[0].position, LogPosition(partition: 1, offset: 9))
        var meterOnly = event
        meterOnly.model = ""
        XCTAssertNil(MeterReading.of(PositionedEvent(event: meterOnly, position: LogPosition(partition: 1, offset: 9)))[0].properties["model"])
    }

    /// "é" as one code point and as "e" + a combining accent are equal Swift strings but two
    /// values to PostgreSQL: they stay two values and two windows, in one batch as in two.
    func testCanonicallyEquivalentTextsStayApartAsPostgreSQLKeepsThem() {
        let catalog = MeterCatalog([MeterDefinition(name: "users", unit: "user", aggregation: .uniqueCount(property: "end_user"), dimensions: ["team"])])
        let composed = "caf\u{E9}", decomposed = "cafe\u{301}"
        XCTAssertEqual(composed, decomposed, "Swift's equality")
        let readings = [composed, decomposed].enumerated().map { index, text in
            MeterReading(meter: "users", customerID: "acme", time: 0, position: LogPosition(partition: 0, offset: Int64(index)), quantity: 1,
                         properties: ["end_user": text, "team": text])
        }
        let together = MeterWindows.fold(readings, catalog: catalog, granularities: [.hour])
        var apart = MeterWindows.fold([readings[0]], catalog: catalog, granularities: [.hour])
        MeterWindows.merge(MeterWindows.fold([readings[1]], catalog: catalog, granularities: [.hour]), into: &apart)
        XCTAssertEqual(together.count, 2, "one window per team value")
        XCTAssertEqual(together, apart)
        XCTAssertEqual(together.values.map(\.result), [1, 1])
        var deltas = WindowDeltas(granularities: [.hour])
        for model in [composed, decomposed] {
            deltas.add(UsageEvent(id: model, source: "s", subject: "acme", time: EventTime(microseconds: 0), model: model, inputTokens: 1, outputTokens: 1))
        }
        XCTAssertEqual(deltas.windows[.hour]?.count, 2, "token windows keep the two models apart too")
    }

    /// The aggregator's fold straight from events equals the reference fold of their readings,
    /// labels, missing properties, meter-only events and undeclared meters included.
    func testFoldingEventsEqualsFoldingTheirReadings() {
        let catalog = MeterCatalog([
            MeterDefinition(name: "searches", unit: "search", aggregation: .sum, dimensions: ["team", "feature"]),
            MeterDefinition(name: "calls", unit: "call", aggregation: .count),
            MeterDefinition(name: "peak", unit: "token", aggregation: .max, dimensions: ["model"]),
            MeterDefinition(name: "seats", unit: "seat", aggregation: .latest, dimensions: ["environment"]),
            MeterDefinition(name: "users", unit: "user", aggregation: .uniqueCount(property: "end_user"), dimensions: ["provider"]),
        ])
        var random = SplitMix(seed: 99)
        func pick<T>(_ values: [T]) -> T { values[Int(random.next() % UInt64(values.count))] }
        for round in 0..<20 {
            var events: [PositionedEvent] = []
            for index in 0..<300 {
                var properties: [String: String] = [:]
                if let team = pick(["a", "b", nil] as [String?]) { properties["team"] = team }
                if let user = pick(["u1", "u2", "u3", nil] as [String?]) { properties["end_user"] = user }
                if random.next() % 4 == 0 { properties["feature"] = "spoofed"; properties["model"] = "prop-model" }
                var meters: [String: Int64] = [:]
                for name in ["searches", "calls", "peak", "seats", "users", "undeclared"] where random.next() % 2 == 0 {
                    meters[name] = Int64(random.next() % 5)
                }
                let customer = "c\(index % 3)"
                let event = UsageEvent(id: "e\(round)-\(index)", source: "s", subject: customer,
                                       time: EventTime(microseconds: Int64(random.next() % 4) * 3_600_000_000 + Int64(random.next() % 1000)),
                                       model: pick(["gpt-4o", ""]), provider: pick(["openai", nil]), feature: pick(["chat", nil]),
                                       environment: pick(["prod", nil]), inputTokens: 0, outputTokens: 0, properties: properties, meters: meters)
                events.append(PositionedEvent(event: event, position: LogPosition(partition: Int32(index % 3), offset: Int64(index))))
            }
            let (windows, undeclared) = MeterWindows.foldHours(events, catalog: catalog)
            XCTAssertEqual(windows, MeterWindows.fold(events.flatMap(MeterReading.of), catalog: catalog, granularities: [.hour]), "round \(round)")
            XCTAssertEqual(undeclared.map(\.reading), events.flatMap(MeterReading.of).filter { $0.meter == "undeclared" })
            XCTAssertEqual(undeclared.map(\.eventID), events.filter { $0.event.meters["undeclared"] != nil }.map(\.event.id))
        }
    }
}
