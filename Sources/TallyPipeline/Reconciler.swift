import Logging
import TallyCore
import TallyKafka
import TallyPostgres

/// One disagreement between a recount from the topic and a materialized table.
public struct ReconcileMismatch: Sendable {
    public let table: String
    public let key: String
    public let recounted: String
    public let stored: String
}

public struct ReconcileResult: Sendable {
    public var records = 0
    public var windowsCompared = 0
    public var chargesCompared = 0
    public var mismatches: [ReconcileMismatch] = []
    /// Partitions whose log no longer starts at offset zero (retention or deleted records), with
    /// the first offset still there: what the records before it counted cannot be recounted.
    public var logStarts: [Int32: Int64] = [:]
}

/// Recounts usage straight from the topic and compares it with the aggregator's windows and the
/// rater's rated totals. Each consumer is recounted up to its own stored offsets, read in the same
/// PostgreSQL snapshot as its tables, so the comparison is exact while the consumers keep running.
public struct Reconciler {
    public let connection: PostgresConnection
    public let kafka: KafkaConfiguration
    public let topic: String
    public let aggregatorGroup: String
    public let raterGroup: String
    /// Records the consumers set aside as on the wrong partition are not recounted either.
    public let partitioner: KeyPartitioner
    public let logger: Logger

    public init(connection: PostgresConnection, kafka: KafkaConfiguration, topic: String, aggregatorGroup: String, raterGroup: String,
                partitioner: KeyPartitioner = .murmur2, logger: Logger) {
        self.connection = connection
        self.partitioner = partitioner
        self.kafka = kafka
        self.topic = topic
        self.aggregatorGroup = aggregatorGroup
        self.raterGroup = raterGroup
        self.logger = logger
    }

    private struct Snapshot {
        /// The topic's recorded dedup horizon and where each partition's started.
        var horizon = DedupHorizon(days: DedupHorizon.defaultDays)
        var horizonFrom: [Int32: Int64] = [:]
        var aggregatorOffsets: [Int32: Int64] = [:]
        var raterOffsets: [Int32: Int64] = [:]
        /// Display key → (customer, measures).
        var windows: [String: (customer: String, measures: [Int128])] = [:]
        var charges: [ChargeKey: (quantity: Int64, amount: Int64)] = [:]
        var profiles: [String: BillingProfile] = [:]
        var catalog = PriceCatalog(books: [])
        var meterCatalog = MeterCatalog([])
        /// Hourly meter windows: display key → (customer, figure).
        var meterWindows: [String: (customer: String, value: String)] = [:]
        /// Readings kept for undeclared meters: "customer meter" → (customer, count).
        var undeclared: [String: (customer: String, count: Int)] = [:]
    }

    public func run(customerID: String?, partition: Int32?) throws -> ReconcileResult {
        let snapshot = try readSnapshot(customerID: customerID)
        let admin = try KafkaAdmin(configuration: kafka, logger: logger)
        let partitionCount = Int32(try admin.partitionCount(of: topic))
        let partitions = (0..<partitionCount).filter { partition == nil || $0 == partition }
        var targets: [Int32: Int64] = [:]
        for partition in partitions {
            targets[partition] = max(snapshot.aggregatorOffsets[partition] ?? 0, snapshot.raterOffsets[partition] ?? 0)
        }
        var usage: [PositionedEvent] = []
        var raterRecords: [RaterRecord] = []
        var result = ReconcileResult()
        var clocks: [Int32: Int64] = [:]
        result.logStarts = try read(targets) { record in
            let classified = record.classified(partitions: partitionCount, partitioner: partitioner)
            // The consumers' dedup horizon, judged along every record of the partition as they do.
            let usageTime: EventTime? = if case .event(.usage(let event)) = classified { event.time } else { nil }
            let judged = snapshot.horizon.judge(offset: record.offset, fromOffset: snapshot.horizonFrom[record.partition] ?? 0,
                                                clock: clocks[record.partition], recordMilliseconds: record.timestampMilliseconds,
                                                eventTime: usageTime, exempt: record.header(rateUnpricedHeader) != nil)
            clocks[record.partition] = judged.clock
            guard judged.refusal == nil, case .event(let event) = classified,
                  customerID == nil || event.customerID == customerID else { return }
            result.records += 1
            let position = LogPosition(partition: record.partition, offset: record.offset)
            switch event {
            case .usage(let usageEvent):
                let positioned = PositionedEvent(event: usageEvent, position: position)
                if record.offset < snapshot.aggregatorOffsets[record.partition] ?? 0 { usage.append(positioned) }
                if record.offset < snapshot.raterOffsets[record.partition] ?? 0 { raterRecords.append(.usage(positioned)) }
            case .grant(let grant):
                if record.offset < snapshot.raterOffsets[record.partition] ?? 0 {
                    raterRecords.append(.grant(PositionedGrant(grant: grant, position: position)))
                }
            case .grantVoid(let void):
                // No charge of its own; in the dedup decision so its id is taken as the rater took it.
                if record.offset < snapshot.raterOffsets[record.partition] ?? 0 {
                    raterRecords.append(.grantVoid(PositionedGrantVoid(void: void, position: position)))
                }
            case .budget(let budget):
                if record.offset < snapshot.raterOffsets[record.partition] ?? 0 {
                    raterRecords.append(.budget(PositionedBudget(budget: budget, position: position)))
                }
            }
        }
        // With one partition, stored rows of customers it does not hold are not this run's business;
        // otherwise every stored row must be explained by the log.
        let onlyRecounted = partition != nil
        let counted = Deduplicator.decide(usage, stored: [:]).accepted
        compareWindows(counted, snapshot: snapshot, onlyRecounted: onlyRecounted, result: &result)
        compareMeters(counted, snapshot: snapshot, onlyRecounted: onlyRecounted, result: &result)
        compareCharges(Deduplicator.decide(raterRecords, stored: [:]).accepted, snapshot: snapshot, onlyRecounted: onlyRecounted, result: &result)
        return result
    }

    /// Offsets and tables in one REPEATABLE READ snapshot.
    private func readSnapshot(customerID: String?) throws -> Snapshot {
        try connection.transaction { connection in
            try connection.query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            var snapshot = Snapshot()
            // The column's CHECK keeps it in DedupHorizon's range; no row: nothing recorded the topic yet.
            if let days = try connection.query("SELECT dedup_horizon_days FROM tally.topic_layouts WHERE topic = $1", [topic]).rows.first?[0]
                .flatMap({ Int($0) }) {
                snapshot.horizon = DedupHorizon(days: days)
            }
            let starts = try connection.query("SELECT partition, from_offset FROM tally.dedup_horizon_start WHERE topic = $1", [topic])
            for row in 0..<starts.rowCount {
                snapshot.horizonFrom[Int32(try starts.value(row, 0, as: Int64.self))] = try starts.value(row, 1, as: Int64.self)
            }
            for (group, isAggregator) in [(aggregatorGroup, true), (raterGroup, false)] {
                let result = try connection.query("SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2", [group, topic])
                for row in 0..<result.rowCount {
                    let partition = Int32(try result.value(row, 0, as: Int64.self)), offset = try result.value(row, 1, as: Int64.self)
                    if isAggregator { snapshot.aggregatorOffsets[partition] = offset } else { snapshot.raterOffsets[partition] = offset }
                }
            }
            let windows = try connection.query("""
                SELECT customer_id, \(microseconds("window_start")), model, feature, provider, environment, input_tokens, output_tokens,
                       cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, total_tokens, event_count, status
                FROM usage_windows WHERE $1::text IS NULL OR customer_id = $1
                """, [customerID])
            for row in 0..<windows.rowCount {
                let key = Self.windowKey(try windows.value(row, 1, as: Int64.self), UsageDimensions(
                    customerID: try windows.value(row, 0, as: String.self), model: try windows.value(row, 2, as: String.self),
                    feature: try windows.value(row, 3, as: String.self), provider: try windows.value(row, 4, as: String.self),
                    environment: try windows.value(row, 5, as: String.self), status: try windows.value(row, 13, as: String.self)))
                snapshot.windows[key] = (try windows.value(row, 0, as: String.self), try (6...12).map { try windows.value(row, $0, as: Int128.self) })
            }
            let charges = try connection.query("""
                SELECT customer_id, \(microseconds("period_start")), book_name, book_customer, book_version, model, token_type, context_above,
                       price_rule, quantity, amount_nanos
                FROM rated_usage WHERE $1::text IS NULL OR customer_id = $1
                """, [customerID])
            for row in 0..<charges.rowCount {
                let item = PriceItem(bookName: try charges.value(row, 2, as: String.self), bookCustomer: try charges.value(row, 3, as: String.self), bookVersion: Int(try charges.value(row, 4, as: Int64.self)),
                                     model: try charges.value(row, 5, as: String.self), tokenType: try charges.value(row, 6, parsedBy: TokenType.init(rawValue:)),
                                     contextAbove: try charges.value(row, 7, as: Int64.self), rule: try charges.value(row, 8, as: String.self))
                snapshot.charges[ChargeKey(customerID: try charges.value(row, 0, as: String.self), periodStart: try charges.value(row, 1, as: Int64.self), item: item)] =
                    (try charges.value(row, 9, as: Int64.self), try charges.value(row, 10, as: Int64.self))
            }
            snapshot.meterCatalog = try MeterCatalogStore(connection: connection).latest()?.catalog ?? MeterCatalog([])
            let meterWindows = try connection.query("""
                SELECT customer_id, meter, \(microseconds("window_start")), dimensions::text, value::text
                FROM meter_windows WHERE granularity = 'hour' AND ($1::text IS NULL OR customer_id = $1)
                """, [customerID])
            for row in 0..<meterWindows.rowCount {
                var dimensions: [String: String] = [:]
                if case .success(.object(let members)) = JSONValue.parse(Array(try meterWindows.value(row, 3, as: String.self).utf8)) {
                    for case (let name, .string(let value)) in members { dimensions[name] = value }
                }
                let customer = try meterWindows.value(row, 0, as: String.self)
                let key = Self.meterWindowKey(customer, try meterWindows.value(row, 1, as: String.self), try meterWindows.value(row, 2, as: Int64.self), dimensions)
                snapshot.meterWindows[key] = (customer, try meterWindows.value(row, 4, as: String.self))
            }
            let undeclared = try connection.query("""
                SELECT customer_id, meter, count(*) FROM meter_undeclared_readings WHERE $1::text IS NULL OR customer_id = $1 GROUP BY 1, 2
                """, [customerID])
            for row in 0..<undeclared.rowCount {
                let customer = try undeclared.value(row, 0, as: String.self)
                snapshot.undeclared["\(customer) \(try undeclared.value(row, 1, as: String.self))"] = (customer, Int(try undeclared.value(row, 2, as: Int64.self)))
            }
            let store = BillingCatalogStore(connection: connection)
            snapshot.catalog = try store.loadCatalog()
            let customers = try connection.query("SELECT customer_id FROM customers").rows.compactMap { $0[0] }
            snapshot.profiles = try store.profiles(customers)
            return snapshot
        }
    }

    /// Reads each partition from offset zero up to its target.
    /// Reads each partition from its first retained record up to its target; answers the
    /// partitions whose first record is past offset zero, with that offset.
    private func read(_ targets: [Int32: Int64], _ handle: (ConsumerRecord) throws -> Void) throws -> [Int32: Int64] {
        let pending = targets.filter { $0.value > 0 }
        guard !pending.isEmpty else { return [:] }
        let consumer = try KafkaConsumer(configuration: kafka, groupID: nil, logger: logger)
        defer { consumer.close() }
        try consumer.assign(Dictionary(uniqueKeysWithValues: pending.keys.map { (TopicPartition(topic, $0), KafkaOffset.beginning) }))
        var positions: [Int32: Int64] = [:]
        var logStarts: [Int32: Int64] = [:]
        var idlePolls = 0
        while pending.contains(where: { (positions[$0.key] ?? -1) + 1 < $0.value }) {
            let records = consumer.poll(maxRecords: 10_000, timeout: .milliseconds(500))
            idlePolls = records.isEmpty ? idlePolls + 1 : 0
            if idlePolls > 60 { throw ReconcileError(message: "the topic stopped before the stored offsets \(pending) (read up to \(positions)): was it truncated or recreated?") }
            for record in records where record.offset < pending[record.partition] ?? 0 {
                if positions[record.partition] == nil && record.offset > 0 { logStarts[record.partition] = record.offset }
                positions[record.partition] = record.offset
                try handle(record)
            }
        }
        return logStarts
    }

    private static func windowKey(_ start: Int64, _ dimensions: UsageDimensions) -> String {
        "\(dimensions.customerID) \(EventTime.format(microseconds: start)) \(dimensions.model) feature=\(dimensions.feature) "
            + "provider=\(dimensions.provider) environment=\(dimensions.environment) status=\(dimensions.status)"
    }

    private func compareWindows(_ events: [PositionedEvent], snapshot: Snapshot, onlyRecounted: Bool, result: inout ReconcileResult) {
        var deltas = WindowDeltas(granularities: [.hour])
        for positioned in events { deltas.add(positioned.event) }
        var recounted: [String: [Int128]] = [:]
        for (key, measures) in deltas.rows(.hour) {
            recounted[Self.windowKey(key.start, key.dimensions)] = measures.values
        }
        let customers = Set(events.map(\.event.subject))
        let stored = snapshot.windows.filter { !onlyRecounted || customers.contains($0.value.customer) }.mapValues(\.measures)
        for key in Set(recounted.keys).union(stored.keys).sorted() {
            result.windowsCompared += 1
            let expected = recounted[key], actual = stored[key]
            if expected != actual {
                result.mismatches.append(ReconcileMismatch(table: "usage_windows_hourly", key: key,
                                                           recounted: expected.map { "\($0)" } ?? "no row", stored: actual.map { "\($0)" } ?? "no row"))
            }
        }
    }

    private static func meterWindowKey(_ customer: String, _ meter: String, _ start: Int64, _ dimensions: [String: String]) -> String {
        "\(customer) \(meter) \(EventTime.format(microseconds: start))" + dimensions.sorted { $0.key < $1.key }.map { " \($0.key)=\($0.value)" }.joined()
    }

    /// Hourly meter windows folded afresh from the counted events with the catalog in force (a
    /// meter declared late had its earlier readings folded when it was declared), and the
    /// readings kept for meters still undeclared.
    private func compareMeters(_ events: [PositionedEvent], snapshot: Snapshot, onlyRecounted: Bool, result: inout ReconcileResult) {
        let readings = events.flatMap(MeterReading.of)
        var recounted: [String: String] = [:]
        for (key, value) in MeterWindows.fold(readings, catalog: snapshot.meterCatalog, granularities: [.hour]) {
            guard let meter = snapshot.meterCatalog.meters[key.meter] else { continue }
            let dimensions = Dictionary(zip(meter.dimensions, key.dimensions)) { first, _ in first }
            recounted[Self.meterWindowKey(key.customerID, key.meter, key.start, dimensions)] = String(value.result)
        }
        var undeclared: [String: Int] = [:]
        for reading in readings where snapshot.meterCatalog.meters[reading.meter] == nil { undeclared["\(reading.customerID) \(reading.meter)", default: 0] += 1 }
        let customers = Set(events.map(\.event.subject))
        let stored = snapshot.meterWindows.filter { !onlyRecounted || customers.contains($0.value.customer) }.mapValues(\.value)
        for key in Set(recounted.keys).union(stored.keys).sorted() {
            result.windowsCompared += 1
            if recounted[key] != stored[key] {
                result.mismatches.append(ReconcileMismatch(table: "meter_windows_hourly", key: key, recounted: recounted[key] ?? "no row", stored: stored[key] ?? "no row"))
            }
        }
        let storedUndeclared = snapshot.undeclared.filter { !onlyRecounted || customers.contains($0.value.customer) }.mapValues(\.count)
        for key in Set(undeclared.keys).union(storedUndeclared.keys).sorted() where undeclared[key] != storedUndeclared[key] {
            result.mismatches.append(ReconcileMismatch(table: "meter_undeclared_readings", key: key, recounted: "\(undeclared[key] ?? 0) readings",
                                                       stored: "\(storedUndeclared[key] ?? 0) readings"))
        }
    }

    private func compareCharges(_ records: [RaterRecord], snapshot: Snapshot, onlyRecounted: Bool, result: inout ReconcileResult) {
        var state = RatingState()
        state.profiles = snapshot.profiles
        _ = RatingEngine(catalog: snapshot.catalog, meters: snapshot.meterCatalog).apply(records, to: &state)
        let customers = Set(records.map(\.customerID))
        let stored = snapshot.charges.filter { !onlyRecounted || customers.contains($0.key.customerID) }
        for key in Set(state.charges.keys).union(stored.keys).sorted() {
            result.chargesCompared += 1
            let expected = state.charges[key].map { ($0.quantity, $0.amountNanos) }
            let actual = stored[key]
            if expected?.0 != actual?.quantity || expected?.1 != actual?.amount {
                let name = "\(key.customerID) \(BillingPeriod(start: key.periodStart, end: key.periodStart).label) \(key.item.model) \(key.item.tokenType.rawValue) (\(key.item.bookName) v\(key.item.bookVersion))"
                result.mismatches.append(ReconcileMismatch(table: "rated_usage", key: name,
                                                           recounted: expected.map { "quantity \($0.0), amount \(Money.format(nanos: $0.1))" } ?? "no row",
                                                           stored: actual.map { "quantity \($0.quantity), amount \(Money.format(nanos: $0.amount))" } ?? "no row"))
            }
        }
    }
}

public struct ReconcileError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}
