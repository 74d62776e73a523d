import ArgumentParser
import Dispatch
import Foundation
import Logging
import TallyCLI
import TallyKafka
import TallyPipeline
import TallyPostgres

@main
struct TallyAggregator: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tally-aggregator",
        abstract: "Tally's dedup/aggregation consumer: exactly-once usage windows in PostgreSQL.",
        discussion: """
            Reads the usage topic in a consumer group, drops duplicates by (customer, event id) and keeps \
            hourly, daily and monthly usage windows. Each batch's effect and its offsets commit in one \
            PostgreSQL transaction; offsets are fenced by an owner epoch. Start more instances with the \
            same group to scale out. SIGTERM finishes the batch, commits, leaves the group and exits 0.
            """)

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @OptionGroup var ops: OpsOptions

    @Option(help: "Consumer group. Env: TALLY_AGGREGATOR_GROUP. Default: tally-aggregator.")
    var group: String?

    @Option(help: "Largest batch, in records.")
    var batchSize = 20_000

    @Option(help: "Longest wait for a batch to fill, in milliseconds.")
    var batchTimeoutMs = 250

    @Option(help: "Kafka session timeout in milliseconds: how long a silent instance keeps its partitions.")
    var sessionTimeoutMs = 10_000

    @Option(help: "Seconds between progress log lines.")
    var statsIntervalSeconds = 10

    @Flag(help: "Exit 0 once every assigned partition is consumed to its log end.")
    var exitWhenCaughtUp = false

    func validate() throws {
        guard batchSize > 0, batchTimeoutMs > 0 else { throw ValidationError("--batch-size and --batch-timeout-ms must be positive") }
    }

    func run() throws {
        JSONLogHandler.bootstrap(service: "tally-aggregator", level: logging.logLevel)
        let registry = OpsOptions.bootstrapMetrics()
        let logger = Logger(label: "tally.aggregator")
        var settings = AggregatorSettings()
        settings.group = group ?? environment("TALLY_AGGREGATOR_GROUP") ?? "tally-aggregator"
        settings.topic = kafka.topic
        settings.deadLetterTopic = kafka.deadLetterTopic
        settings.batchSize = batchSize
        settings.batchTimeout = .milliseconds(batchTimeoutMs)
        settings.statsInterval = .seconds(statsIntervalSeconds)
        settings.exitWhenCaughtUp = exitWhenCaughtUp
        if let delay = environment("TALLY_FAULT_COMMIT_DELAY_MS").flatMap(Int.init) { settings.faultCommitDelay = .milliseconds(delay) }

        var properties = try kafka.extraProperties
        properties["session.timeout.ms"] = properties["session.timeout.ms"] ?? String(sessionTimeoutMs)
        let kafkaConfiguration = KafkaConfiguration(brokers: try kafka.brokers, properties: properties)
        let connection = try PostgresConnection(url: try database.databaseURL, logger: logger, connectTimeout: .seconds(60), searchPath: "tally")
        let instanceID = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        let store = AggregatorStore(connection: connection, group: settings.group, topic: settings.topic,
                                    instanceID: instanceID, logger: logger)
        let stop = SharedFlag()
        let signals = [SIGTERM, SIGINT].map { number -> DispatchSourceSignal in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                logger.info("signal \(number): finishing the batch and leaving the group")
                stop.set()
            }
            source.resume()
            return source
        }
        defer { signals.forEach { $0.cancel() } }
        logger.info("starting", metadata: ["group": "\(settings.group)", "topic": "\(settings.topic)", "instance": "\(instanceID)"])
        let loop = try AggregatorLoop(kafka: kafkaConfiguration, store: store, settings: settings, logger: logger, stop: stop)
        let opsServer = try ops.start(registry: registry, logger: logger, ready: { loop.isReady })
        try loop.run()
        _ = opsServer
    }
}
