import ArgumentParser
import Foundation
import Logging
import TallyCLI
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

struct Replay: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Rebuild a consumer's state from offset zero into a shadow schema and compare it with the live state.",
        discussion: """
            The live consumers keep running. The replay reads the topic from offset zero (or from the earliest \
            retained offset, said plainly) in a consumer group of its own, into schema tally_replay_<consumer>_<id>, \
            with the price books in force (or --pricing FILE applied on top, for the replay only). It shows progress \
            per partition and ends with a report: per customer and line item, live versus replayed, and per table the \
            checksums of both. Exit 0: nothing differs (or --promote handed over); 1: something differs; 2: the handover \
            did not succeed. The shadow schema is kept for inspection (dropped with --dry-run, or once promoted).
            """)

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @OptionGroup var creditKeys: CreditKeyOptions

    @Option(help: "aggregator or rater.") var consumer: String
    @Option(help: "Only these partitions, comma-separated (e.g. 0,3); their customers only.") var partitions: String?
    @Option(help: "A price book file to rate the replay with (applied in the shadow schema only; rater).") var pricing: String?
    @Flag(help: "Drop the shadow schema after the report.") var dryRun = false
    @Flag(help: "After the report, replace the live state of the replayed partitions with the replayed one and hand over to the live consumer.")
    var promote = false
    @Option(help: "The live consumer group to compare with. Default: tally-<consumer>.") var liveGroup: String?
    @Option(help: "table or json.") var format = "table"
    @Option(help: "Records per batch.") var batchSize = 50_000

    func validate() throws {
        guard ReplayedConsumer(rawValue: consumer) != nil else { throw ValidationError("--consumer: aggregator or rater") }
        if pricing != nil && consumer != "rater" { throw ValidationError("--pricing applies to the rater") }
        if promote && dryRun { throw ValidationError("--promote and --dry-run exclude each other") }
        _ = try partitionSet()
    }

    func partitionSet() throws -> Set<Int32>? {
        guard let partitions else { return nil }
        let numbers = partitions.split(separator: ",").map { Int32($0.trimmingCharacters(in: .whitespaces)) }
        guard !numbers.isEmpty, numbers.allSatisfy({ ($0 ?? -1) >= 0 }) else { throw ValidationError("--partitions: e.g. 0,3") }
        return Set(numbers.map { $0! })
    }

    func run() throws {
        let logger = makeLogger(logging, label: "tally.replay")
        let replayed = ReplayedConsumer(rawValue: consumer)!
        let subset = try partitionSet()
        // A rater replay applies the credit the live rater applied: signed with a key of the keyring.
        let creditKeyring = replayed == .rater ? try creditKeys.verifyingKeyring(logger: logger) : nil
        let book: PriceBook? = try pricing.map { path in
            do { return try PriceBookDocument.parse(try readText(path)) } catch let error as ConfigError { throw ValidationError("\(path): \(error)") }
        }
        let url = try database.databaseURL
        let connection = try connect(database, label: "tally.replay")
        let id = "\(Int(Date().timeIntervalSince1970))_\(UInt16.random(in: 0...UInt16.max))"
        let shadow = ShadowSchema(name: "tally_replay_\(replayed.rawValue)_\(id)", consumer: replayed)
        let pricingVersion = try shadow.create(on: connection, databaseURL: url, pricing: book)
        print("replaying \(replayed.rawValue) into schema \(shadow.name)\(subset.map { " (partitions \($0.sorted().map(String.init).joined(separator: ",")))" } ?? "")"
              + (pricingVersion.map { "; \(book!.name) version \($0) from \(pricing!) applies in the replay only" } ?? ""), to: &standardError)

        var settings = ConsumerSettings(group: "tally-replay-\(replayed.rawValue)-\(id)", metricsPrefix: "tally_replay")
        settings.topic = kafka.topic
        settings.deadLetterTopic = kafka.deadLetterTopic
        settings.partitioner = try kafka.partitioner
        settings.dedupHorizon = try kafka.dedupHorizon
        let liveConnection = connection
        let topic = kafka.topic
        settings.checkLayout = { layout in try layout.check(topic: topic, on: liveConnection) }
        if let creditKeyring { settings.creditVerifier = try CreditVerifier.recorded(keyring: creditKeyring, topic: topic, on: connection) }
        settings.batchSize = batchSize
        settings.exitWhenCaughtUp = true
        settings.statsInterval = .seconds(3600)
        let meter = ProgressMeter()
        settings.onProgress = { progress in meter.show(progress) }
        let replayConnection = try PostgresConnection(url: url, logger: logger, searchPath: shadow.searchPath)
        let instance = "replay-\(id)"
        var store: any ConsumerStore = replayed == .aggregator
            ? AggregatorStore(connection: replayConnection, group: settings.group, topic: settings.topic, instanceID: instance,
                              folder: WindowFolder(connection: try PostgresConnection(url: url, logger: logger, searchPath: shadow.searchPath)))
            : RaterStore(connection: replayConnection, group: settings.group, topic: settings.topic, instanceID: instance, logger: logger)
        if let subset { store = PartitionSubsetStore(store, partitions: subset) }
        // A group of one member: a short session makes the join quick.
        let kafkaConfiguration = KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties).groupMember(sessionTimeoutMs: 6000)
        let loop = try ConsumerLoop(kafka: kafkaConfiguration, store: store, settings: settings, logger: logger, stop: SharedFlag())
        try loop.run()
        meter.finish(loop.stats)
        let live = liveGroup ?? replayed.liveGroup

        let report = try ReplayReport.build(connection: connection, shadow: shadow, liveGroup: live,
                                            replayGroup: settings.group, topic: settings.topic, partitions: subset)
        // Written directly, unbuffered: the report is whole before anything else reaches standard error.
        FileHandle.standardOutput.write(Data((format == "json" ? report.json() : report.table()).utf8))
        if dryRun {
            try shadow.drop(on: connection)
            print("dropped \(shadow.name) (--dry-run)", to: &standardError)
        }
        if promote {
            // The live consumer may have moved on during the replay: replay further until the
            // handover finds it at or behind the replay.
            for attempt in 1...20 {
                let replayedPartitions = Set(try connection.query("SELECT partition FROM \(shadow.schema).consumer_offsets WHERE consumer_group = $1",
                                                                  [settings.group]).rows.compactMap { $0[0].flatMap { Int32($0) } })
                let ends = { try kafka.logEnds(subset ?? replayedPartitions, logger: logger, confirmedOnly: true) }
                switch try shadow.promote(on: connection, liveGroup: live, replayGroup: settings.group, topic: settings.topic, partitions: subset,
                                          logEnds: ends) {
                case .promoted(let customers, let pastLogEnd):
                    if !pastLogEnd.isEmpty {
                        print("  the live consumer stood past the log end on partitions \(pastLogEnd): what it counted there that the log no longer holds is replaced by what the log holds; restart the live consumers",
                              to: &standardError)
                    }
                    try shadow.drop(on: connection)
                    print("promoted \(shadow.name) into tally: \(customers) customers\(subset.map { " of partitions \($0.sorted().map(String.init).joined(separator: ","))" } ?? ""); the live consumer continues from the replayed offsets",
                          to: &standardError)
                    return
                case .liveAhead(let partitions):
                    print("  handover \(attempt): the live consumer is ahead on partitions \(partitions); replaying the rest", to: &standardError)
                    let more = try ConsumerLoop(kafka: kafkaConfiguration, store: store, settings: settings, logger: logger, stop: SharedFlag())
                    try more.run()
                }
            }
            print("could not hand over: the live consumer kept moving ahead; the shadow schema \(shadow.name) is kept", to: &standardError)
            throw ExitCode(2)
        }
        if !report.identical { throw ExitCode(1) }
    }
}

/// Prints replay progress to standard error, at most every two seconds.
final class ProgressMeter: @unchecked Sendable {
    private let started = ContinuousClock.now
    private var lastShown = ContinuousClock.now - .seconds(10)

    func show(_ progress: ConsumerProgress) {
        let now = ContinuousClock.now
        guard now - lastShown >= .seconds(2) else { return }
        lastShown = now
        let elapsed = max((now - started).totalSeconds, 0.001)
        let rate = Double(progress.stats.records) / elapsed
        let remaining = progress.positions.values.reduce(Int64(0)) { $0 + max(0, ($1.end ?? $1.next) - $1.next) }
        let parts = progress.positions.keys.sorted().map { partition -> String in
            let position = progress.positions[partition]!
            return "p\(partition) \(position.next)/\(position.end.map(String.init) ?? "?")"
        }
        let eta = rate > 0 ? "\(Int(Double(remaining) / rate)) s" : "?"
        print("  \(parts.joined(separator: "  "))  \(Int(rate)) records/s  ETA \(eta)", to: &standardError)
    }

    func finish(_ stats: ConsumerStats) {
        let elapsed = max((ContinuousClock.now - started).totalSeconds, 0.001)
        print("  replayed \(stats.records) records (\(stats.accepted) counted, \(stats.duplicates) duplicates, \(stats.deadLetters) dead letters) in \(Int(elapsed)) s, \(Int(Double(stats.records) / elapsed)) records/s including the group join",
              to: &standardError)
    }
}

/// What a replay found: positions, differences per line item, checksums per table.
struct ReplayReport {
    let shadow: ShadowSchema
    let positions: [(partition: Int32, live: Int64?, replayed: Int64?)]
    let differences: [ReplayDifference]
    let checksums: [(table: String, live: TableChecksum, replayed: TableChecksum)]

    var identical: Bool { differences.isEmpty && checksums.allSatisfy { $0.live.rows == $0.replayed.rows && $0.live.md5 == $0.replayed.md5 } }

    static func build(connection: PostgresConnection, shadow: ShadowSchema, liveGroup: String, replayGroup: String, topic: String,
                      partitions: Set<Int32>?) throws -> ReplayReport {
        func offsets(_ schema: SQLIdentifier, _ group: String) throws -> [Int32: Int64] {
            let result = try connection.query("SELECT partition, next_offset FROM \(schema).consumer_offsets WHERE consumer_group = $1 AND topic = $2",
                                              [group, topic])
            var offsets: [Int32: Int64] = [:]
            for row in 0..<result.rowCount { offsets[Int32(try result.value(row, 0, as: Int64.self))] = try result.value(row, 1, as: Int64.self) }
            return offsets
        }
        let live = try offsets(.tally, liveGroup), replay = try offsets(shadow.schema, replayGroup)
        let chosen = partitions ?? Set(live.keys).union(replay.keys)
        let positions = chosen.sorted().map { (partition: $0, live: live[$0], replayed: replay[$0]) }
        let liveSums = try StateChecksum.compute(connection, schema: .tally, consumer: shadow.consumer, group: liveGroup,
                                                 partitions: partitions, perPartition: false)
        let replaySums = try StateChecksum.compute(connection, schema: shadow.schema, consumer: shadow.consumer, group: replayGroup,
                                                   partitions: partitions, perPartition: false)
        let checksums = zip(liveSums, replaySums).map { (table: $0.table, live: $0, replayed: $1) }
        return ReplayReport(shadow: shadow, positions: positions,
                            differences: try ReplayDiff.compute(connection, shadow: shadow, partitions: partitions), checksums: checksums)
    }

    private func value(_ measure: String, _ amount: Int128) -> String {
        measure.hasSuffix("_nanos") ? Money.format(amount, scale: Money.nanoScale, minimumFractionDigits: 2) : String(amount)
    }

    func table() -> String {
        var out = "positions (next offset per partition):\n"
        out += TableRenderer.render(header: ["partition", "live", "replayed"], rows: positions.map {
            [String($0.partition), $0.live.map(String.init) ?? "-", $0.replayed.map(String.init) ?? "-"]
        }, format: "table", numericFrom: 0)
        if positions.contains(where: { $0.live != $0.replayed }) {
            out += "note: live and replay stand at different offsets; records between them show up as differences\n"
        }
        out += "\ndifferences (customer, line item):\n"
        out += TableRenderer.render(header: ["customer", "item", "measure", "live", "replayed", "difference"], rows: differences.map {
            [$0.customerID, $0.item, $0.measure.replacingOccurrences(of: "_nanos", with: ""), value($0.measure, $0.live),
             value($0.measure, $0.replayed), value($0.measure, $0.difference)]
        }, format: "table", numericFrom: 3)
        out += "\nchecksums:\n"
        out += TableRenderer.render(header: ["table", "live rows", "live md5", "replayed rows", "replayed md5", "equal"], rows: checksums.map {
            [$0.table, String($0.live.rows), $0.live.md5, String($0.replayed.rows), $0.replayed.md5,
             $0.live.rows == $0.replayed.rows && $0.live.md5 == $0.replayed.md5 ? "yes" : "NO"]
        }, format: "table", numericFrom: 1)
        out += identical ? "\nidentical: the replay rebuilt the live state exactly\n" : "\nDIFFERENT: \(differences.count) line items differ\n"
        return out
    }

    func json() -> String {
        var json = JSONWriter()
        json.raw("{")
        json.key("shadow_schema", first: true); json.string(shadow.name)
        json.key("consumer"); json.string(shadow.consumer.rawValue)
        json.key("identical"); json.raw(identical ? "true" : "false")
        json.key("positions"); json.raw("[")
        for (index, position) in positions.enumerated() {
            json.raw(index == 0 ? "{" : ",{")
            json.key("partition", first: true); json.integer(Int64(position.partition))
            json.key("live"); if let live = position.live { json.integer(live) } else { json.raw("null") }
            json.key("replayed"); if let replayed = position.replayed { json.integer(replayed) } else { json.raw("null") }
            json.raw("}")
        }
        json.raw("]")
        json.key("differences"); json.raw("[")
        for (index, difference) in differences.enumerated() {
            json.raw(index == 0 ? "\n  {" : ",\n  {")
            json.key("customer_id", first: true); json.string(difference.customerID)
            json.key("item"); json.string(difference.item)
            json.key("measure"); json.string(difference.measure)
            json.key("live"); json.integer(difference.live)
            json.key("replayed"); json.integer(difference.replayed)
            json.key("difference"); json.integer(difference.difference)
            json.raw("}")
        }
        json.raw("]")
        json.key("checksums"); json.raw("[")
        for (index, sum) in checksums.enumerated() {
            json.raw(index == 0 ? "\n  {" : ",\n  {")
            json.key("table", first: true); json.string(sum.table)
            json.key("live_rows"); json.integer(sum.live.rows)
            json.key("live_md5"); json.string(sum.live.md5)
            json.key("replayed_rows"); json.integer(sum.replayed.rows)
            json.key("replayed_md5"); json.string(sum.replayed.md5)
            json.raw("}")
        }
        json.raw("]}\n")
        return String(decoding: json.bytes, as: UTF8.self)
    }
}

struct Checksum: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print checksums of a consumer's state tables, per table and partition (row count and md5 of the rows in a fixed order).",
        discussion: "Wall-clock stamps, instance ids and group names are left out, so a replay of the same log gives the same checksums.")
    @OptionGroup var database: DatabaseOptions
    @Option(help: "aggregator or rater.") var consumer: String
    @Option(help: "The schema: tally, or a replay's shadow schema.") var schema = "tally"
    @Option(help: "The consumer group whose rows of shared tables count. Default: tally-<consumer>, or the replay's group in a shadow schema.")
    var group: String?
    @Option(help: "table, json or csv.") var format = "table"

    func validate() throws {
        guard ReplayedConsumer(rawValue: consumer) != nil else { throw ValidationError("--consumer: aggregator or rater") }
        guard schema.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) else { throw ValidationError("--schema: a schema name") }
    }

    func run() throws {
        let replayed = ReplayedConsumer(rawValue: consumer)!
        let connection = try connect(database, label: "tally.checksum")
        var chosenGroup = group ?? replayed.liveGroup
        if group == nil && schema != "tally",
           let replayGroup = try connection.query("SELECT consumer_group FROM \(SQLIdentifier(schema).qualifying("consumer_offsets")) LIMIT 1").scalar {
            chosenGroup = replayGroup
        }
        let sums = try StateChecksum.compute(connection, schema: SQLIdentifier(schema), consumer: replayed, group: chosenGroup)
        print(TableRenderer.render(header: ["table", "partition", "rows", "md5"], rows: sums.map {
            [$0.table, $0.partition.map(String.init) ?? "all", String($0.rows), $0.md5]
        }, format: format, numericFrom: 2), terminator: "")
    }
}

struct Reconcile: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Recount usage straight from the topic and compare it with the usage windows and the rated totals.",
        discussion: """
            Each consumer is recounted up to the offsets it has stored, read in one PostgreSQL snapshot together \
            with its tables, so the comparison is exact while the consumers keep running. Exit 0: everything \
            matches; 1: a mismatch (listed).
            """)
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @Option(help: "Only this customer.") var customer: String?
    @Option(help: "Only this partition.") var partition: Int32?
    @Option(help: "The aggregator's consumer group.") var aggregatorGroup = "tally-aggregator"
    @Option(help: "The rater's consumer group.") var raterGroup = "tally-rater"
    @Option(help: "table, json or csv.") var format = "table"

    func validate() throws {
        if customer != nil && partition != nil { throw ValidationError("give --customer or --partition, not both") }
    }

    func run() throws {
        let logger = makeLogger(logging, label: "tally.reconcile")
        let reconciler = Reconciler(connection: try connect(database, label: "tally.reconcile"),
                                    kafka: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties),
                                    topic: kafka.topic, aggregatorGroup: aggregatorGroup, raterGroup: raterGroup,
                                    partitioner: try kafka.partitioner, logger: logger)
        let result = try reconciler.run(customerID: customer, partition: partition)
        for (partition, start) in result.logStarts.sorted(by: { $0.key < $1.key }) {
            // Said first: it explains the mismatches below.
            print("partition \(partition): the log now starts at offset \(start), not 0 (retention or deleted records): what records "
                  + "0..<\(start) counted cannot be recounted, so their windows and charges show as mismatches", to: &standardError)
        }
        if !result.mismatches.isEmpty {
            print(TableRenderer.render(header: ["table", "row", "recounted from the topic", "stored"], rows: result.mismatches.map {
                [$0.table, $0.key, $0.recounted, $0.stored]
            }, format: format, numericFrom: 4), terminator: "")
        }
        print("recounted \(result.records) records: \(result.windowsCompared) window rows and \(result.chargesCompared) rated totals compared, \(result.mismatches.count) mismatches",
              to: &standardError)
        if !result.mismatches.isEmpty { throw ExitCode(1) }
    }
}

struct BackfillKeySources: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backfill-key-sources",
        abstract: "Give dedup keys stored before migration 0014 the source of their event, read from the log.",
        discussion: """
            Until then such a key stands for its id from any source, and the consumers look keys up on every batch. \
            Safe while they run; run it once after upgrading. Keys whose record the log no longer holds keep standing \
            for any source (they are counted as unreadable).
            """)
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = makeLogger(logging, label: "tally.backfill-key-sources")
        let outcome = try KeySourceBackfill(connection: try connect(database, label: "tally.backfill-key-sources"),
                                            kafka: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties),
                                            topic: kafka.topic, logger: logger).run()
        for (table, count) in outcome.filled.sorted(by: { $0.key < $1.key }) { print("\(table): \(count) filled in") }
        print("\(outcome.unreadable) keys' records are no longer in the log; they keep standing for any source", to: &standardError)
    }
}
