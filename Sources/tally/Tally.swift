import ArgumentParser
import Foundation
import Logging
import TallyCLI
import TallyCore
import TallyKafka
import TallyPostgres

@main
struct Tally: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tally",
        abstract: "Tally's operator tool: migrations, topics, API keys, events, load generation, usage, pricing, wallets, invoices and replay.",
        subcommands: [Migrate.self, Topics.self, Events.self, LoadGen.self, Emit.self, Usage.self, Keys.self,
                      Pricing.self, Meters.self, Customers.self, Grant.self, VoidGrant.self, CreditKeys.self, Balance.self, Budgets.self, Invoices.self, Webhooks.self, Replay.self, Checksum.self, Reconcile.self, BackfillKeySources.self, Status.self, CheckLog.self, Report.self])
}

func makeLogger(_ options: LoggingOptions, label: String) -> Logger {
    JSONLogHandler.bootstrap(service: "tally", level: options.logLevel)
    return Logger(label: label)
}

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply the bundled SQL migrations to schema tally (idempotent).")

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = makeLogger(logging, label: "tally.migrate")
        let connection = try PostgresConnection(url: try database.databaseURL, logger: logger)
        let migrations = try Migrator.bundled()
        let applied = try Migrator(connection: connection, logger: logger).migrate(migrations)
        print(applied.isEmpty
            ? "schema tally is up to date (\(migrations.count) migrations)"
            : "applied migrations \(applied.map(String.init).joined(separator: ", ")) (\(migrations.count) in all)")
        if try connection.query("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").string(0, 0) == "t" {
            logger.warning("Tally connects as a PostgreSQL superuser, which can run programs on the database server (COPY … PROGRAM): give the services a role of their own that is not (docs/security.md)")
        }
    }
}

struct Topics: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage Tally's topics.", subcommands: [Create.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create the usage topic, its dead-letter topic and tally.alerts (existing topics are left as they are).")

        @OptionGroup var kafka: KafkaOptions
        @OptionGroup var logging: LoggingOptions

        @Option(help: "Partitions of a new topic. Consumers scale up to this many instances.")
        var partitions = 4

        @Option(help: "Replication factor of a new topic. Default: the broker's default.replication.factor.")
        var replicationFactor: Int?

        @Option(help: "retention.ms of the usage and dead-letter topics. Default -1, kept forever: the log is what replays rebuild every bill from.")
        var retentionMs: Int64 = -1

        @Option(help: "message.timestamp.type of the usage topic: LogAppendTime (default: the broker stamps each record, so no producer's clock moves the dedup horizon's log clock) or CreateTime.")
        var timestampType = "LogAppendTime"

        func validate() throws {
            guard ["LogAppendTime", "CreateTime"].contains(timestampType) else { throw ValidationError("--timestamp-type is LogAppendTime or CreateTime") }
            guard partitions > 0 else { throw ValidationError("--partitions must be positive") }
            if let replicationFactor, replicationFactor <= 0 { throw ValidationError("--replication-factor must be positive") }
            guard retentionMs >= -1 else { throw ValidationError("--retention-ms is -1 (forever) or a number of milliseconds") }
        }

        func run() throws {
            let logger = makeLogger(logging, label: "tally.topics")
            let admin = try KafkaAdmin(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties), logger: logger)
            // The alerts topic carries the rater's low-balance alerts and top-up requests: the
            // broker's retention suits it. Every topic is tried even when one fails.
            var failed: [String] = []
            for (topic, retained) in [(kafka.topic, true), (kafka.deadLetterTopic, true), ("tally.alerts", false)] {
                var config = retained ? ["retention.ms": String(retentionMs)] : [:]
                if topic == kafka.topic { config["message.timestamp.type"] = timestampType }
                do {
                    let created = try admin.createTopic(topic, partitions: partitions, replicationFactor: replicationFactor ?? -1, config: config)
                    // Right after a creation another broker may not know the topic yet: ask again.
                    let count = try Self.retrying { () throws(KafkaError) in try admin.partitionCount(of: topic) }
                    print("\(topic): \(created ? "created" : "exists"), \(count) partitions"
                          + (created && retained ? ", retention.ms=\(retentionMs)" : "")
                          + (created && topic == kafka.topic ? ", message.timestamp.type=\(timestampType)" : ""))
                } catch {
                    print("\(topic): \(error)", to: &standardError)
                    failed.append(topic)
                }
            }
            if !failed.isEmpty { throw ExitCode(1) }
        }

        /// Tries `body` for up to 30 s while it fails with a retryable error.
        static func retrying<T>(_ body: () throws(KafkaError) -> T) throws(KafkaError) -> T {
            let deadline = ContinuousClock.now + .seconds(30)
            while true {
                switch Result(catching: body) {
                case .success(let value): return value
                case .failure(let error) where error.isRetryable && ContinuousClock.now < deadline: Thread.sleep(forTimeInterval: 0.5)
                case .failure(let error): throw error
                }
            }
        }
    }
}

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Work with usage events.", subcommands: [Validate.self])

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate events (one JSON event per line, or one event per file) against schema v1.",
            discussion: "Prints one line per invalid event with the field path and reason; exits 1 if any is invalid.")

        @Argument(help: "Files to check; - or none reads standard input.")
        var files: [String] = []

        @Flag(help: "Treat each file as one event instead of NDJSON.")
        var wholeFile = false

        func run() throws {
            var invalid = 0
            var total = 0
            for name in files.isEmpty ? ["-"] : files {
                let data = name == "-" ? FileHandle.standardInput.readDataToEndOfFile() : try Data(contentsOf: URL(fileURLWithPath: name))
                let bytes = [UInt8](data)
                let documents: [ArraySlice<UInt8>] = wholeFile ? [bytes[...]] : bytes.split(separator: 0x0a, omittingEmptySubsequences: true)
                for (index, document) in documents.enumerated() {
                    total += 1
                    if case .failure(let error) = EventDecoder.decode(Array(document)) {
                        invalid += 1
                        print("\(name)\(wholeFile ? "" : ":\(index + 1)"): \(error)")
                    }
                }
            }
            print("\(total - invalid) valid, \(invalid) invalid")
            if invalid > 0 { throw ExitCode(1) }
        }
    }
}

struct LoadGen: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "loadgen",
        abstract: "Generate a realistic usage stream (NDJSON to stdout, or straight into the topic).",
        discussion: "Deterministic for a seed: the same flags always give the same events.")

    @Option(help: "Distinct events to generate (duplicates come on top).") var events = 10_000
    @Option(help: "Customers; activity is skewed towards low customer numbers.") var customers = 100
    @Option(help: "Share of extra records that re-send an earlier event (0...1).") var duplicateRate = 0.05
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(help: "Event time of the first event (RFC 3339). Default: so that the last event is now.") var start: String?
    @Option(help: "Milliseconds of event time between events.") var spacingMs: Int64 = 1000
    @Option(help: "Records per second to send (0: as fast as possible).") var rate = 0
    @Option(help: "Prefix of event ids.") var idPrefix = "evt"
    @Flag(help: "Add meters, dimensions and meter-only events (declare examples/meters/agent-meters.yaml first).") var meters = false
    @Flag(help: "Publish to the topic with the Kafka producer instead of printing NDJSON.") var produce = false
    @Flag(help: "Send to tally-ingest over HTTP (see --ingest-url, --api-key) instead of printing NDJSON.") var toIngest = false
    @Option(help: "Events per HTTP request with --to-ingest.") var batchSize = 1000
    @OptionGroup var target: IngestTarget
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions

    func run() async throws {
        let now = Int64(Date().timeIntervalSince1970) * 1_000_000
        guard let startTime = start.map({ EventTime($0) }) ?? EventTime(microseconds: now - Int64(events) * spacingMs * 1000) else {
            throw ValidationError("--start \(start ?? "") is not RFC 3339")
        }
        var generator = LoadGenerator(seed: seed, customers: customers, duplicateRate: duplicateRate,
                                      startMicroseconds: startTime.microseconds, spacingMicroseconds: spacingMs * 1000,
                                      idPrefix: idPrefix)
        generator.meters = meters
        var distinct = 0
        var duplicates = 0
        if toIngest {
            var lines: [[UInt8]] = []
            while distinct < events {
                let (event, isDuplicate) = generator.next()
                if isDuplicate { duplicates += 1 } else { distinct += 1 }
                lines.append(EventEncoder.encode(event))
            }
            try await EmitRunner.send(lines, batchSize: batchSize, target: target, concurrency: 4, pacer: Pacer(rate: rate))
            return
        }
        var pacer = Pacer(rate: rate)
        if !produce {
            var out: [UInt8] = []
            while distinct < events {
                let (event, isDuplicate) = generator.next()
                if isDuplicate { duplicates += 1 } else { distinct += 1 }
                out.append(contentsOf: EventEncoder.encode(event))
                out.append(0x0a)
                if out.count > 1 << 20 || rate > 0 {
                    await pacer.wait(untilSent: distinct + duplicates)
                    FileHandle.standardOutput.write(Data(out))
                    out.removeAll(keepingCapacity: true)
                }
            }
            FileHandle.standardOutput.write(Data(out))
            return
        }
        let logger = makeLogger(logging, label: "tally.loadgen")
        let producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties), logger: logger)
        let clock = ContinuousClock()
        let began = clock.now
        var failed = 0
        while distinct < events {
            var batch: [ProducerRecord] = []
            batch.reserveCapacity(10_000)
            let batchLimit = rate > 0 ? max(1, min(10_000, rate / 20)) : 10_000
            while batch.count < batchLimit && distinct < events {
                let (event, isDuplicate) = generator.next()
                if isDuplicate { duplicates += 1 } else { distinct += 1 }
                batch.append(ProducerRecord(topic: kafka.topic, key: Array(event.subject.utf8), value: EventEncoder.encode(event)))
            }
            await pacer.wait(untilSent: distinct + duplicates)
            for result in await producer.send(batch) {
                if case .failure(let error) = result { failed += 1; logger.error("not written: \(error)") }
            }
        }
        await producer.close()
        let seconds = (clock.now - began).totalSeconds
        let written = distinct + duplicates - failed
        FileHandle.standardError.write(Data("loadgen: \(distinct) events + \(duplicates) duplicates, \(written) acknowledged, \(failed) failed, \(Int(Double(written) / max(seconds, 0.001))) records/s\n".utf8))
        if failed > 0 { throw ExitCode(1) }
    }
}

/// Holds a sender to a rate: records sent so far may not run ahead of `rate` per second.
struct Pacer {
    let rate: Int
    private var started: ContinuousClock.Instant?

    init(rate: Int) { self.rate = rate }

    mutating func wait(untilSent count: Int) async {
        guard rate > 0 else { return }
        let start = started ?? ContinuousClock.now
        started = start
        let due = start + .microseconds(Int64(count) * 1_000_000 / Int64(rate))
        if due > ContinuousClock.now { try? await Task.sleep(until: due, clock: .continuous) }
    }
}
