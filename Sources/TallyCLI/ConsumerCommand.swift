import ArgumentParser
import Dispatch
import Foundation
import Logging
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

/// The flags every consumer executable (aggregator, rater) shares.
public struct ConsumerOptions: ParsableArguments {
    @Option(help: "Consumer group. Default: the executable's own group.")
    var group: String?

    @Option(help: "Largest batch, in records. Default: 50000.")
    var batchSize: Int?

    @Option(help: "Longest wait for a batch to fill, in milliseconds.")
    var batchTimeoutMs = 250

    // 6 s is Kafka's smallest allowed (group.min.session.timeout.ms): librdkafka heartbeats from a
    // thread of its own, so a long batch does not end a session; Tansu takes about half of it to
    // admit a member, so a local start is quicker than with Kafka's 45 s or our earlier 10 s.
    @Option(help: "Kafka session timeout in milliseconds: how long a silent instance keeps its partitions (Kafka's minimum is 6000).")
    var sessionTimeoutMs = 6_000

    @Option(help: "PostgreSQL connections committing a batch's partitions side by side (partition modulo lanes).")
    var commitLanes = 2

    @Option(help: "Seconds between progress log lines.")
    var statsIntervalSeconds = 10

    @Flag(help: "Exit 0 once every assigned partition is consumed to its log end.")
    var exitWhenCaughtUp = false

    public init() {}

    public func validate() throws {
        guard (batchSize ?? 1) > 0, batchTimeoutMs > 0, commitLanes > 0 else {
            throw ValidationError("--batch-size, --batch-timeout-ms and --commit-lanes must be positive")
        }
    }
}

/// What differs between the consumer executables.
public struct ConsumerDescription: Sendable {
    public let service: String
    public let defaultGroup: String
    /// Environment variable that overrides the group (flags win).
    public let groupEnvironment: String
    public let metricsPrefix: String
    /// Records per batch unless --batch-size says otherwise. Every batch rewrites the window rows
    /// or rated totals it touches: larger batches rewrite each less often.
    public let defaultBatchSize: Int

    public init(service: String, defaultGroup: String, groupEnvironment: String, metricsPrefix: String, defaultBatchSize: Int = 50_000) {
        self.defaultBatchSize = defaultBatchSize
        self.service = service
        self.defaultGroup = defaultGroup
        self.groupEnvironment = groupEnvironment
        self.metricsPrefix = metricsPrefix
    }
}

/// Everything a consumer's store and helpers need to be built.
public struct ConsumerContext {
    /// This lane's own connection (see `CommitLanes`); lane 0 also runs per-process helpers.
    public let connection: PostgresConnection
    public let lane: Int
    public let kafka: KafkaConfiguration
    public let settings: ConsumerSettings
    public let instanceID: String
    public let logger: Logger
    public let stop: SharedFlag
}

/// Wraps a consumer's whole store (every commit lane) before the loop runs. Test builds pass
/// TallyTesting's fault decorators (`tally-faults`); the production executables pass none. Gets
/// the loop's settings and a way to open another PostgreSQL connection.
public typealias StoreDecorator = (_ store: any ConsumerStore, _ settings: ConsumerSettings,
                                   _ connect: () throws -> PostgresConnection) throws -> any ConsumerStore

/// A consumer executable's command whose store a test build may decorate (`tally-faults`).
public protocol DecoratableConsumerCommand: ParsableCommand {
    func run(decorate: StoreDecorator?) throws
}

/// Runs a consumer loop until SIGTERM/SIGINT (or caught up): settings from flags and the
/// environment, metrics and the ops endpoint, a PostgreSQL connection, signal handling.
public func runConsumer(_ description: ConsumerDescription, options: ConsumerOptions, database: DatabaseOptions, kafka: KafkaOptions,
                        logging: LoggingOptions, ops: OpsOptions, creditKeys: CreditKeyOptions? = nil, decorate: StoreDecorator? = nil,
                        makeStore: (ConsumerContext) throws -> any ConsumerStore) throws {
    ProcessSetup.ignoreBrokenPipes()
    JSONLogHandler.bootstrap(service: description.service, level: logging.logLevel)
    let registry = OpsOptions.bootstrapMetrics()
    let logger = Logger(label: "tally.\(description.service)")
    var settings = ConsumerSettings(group: options.group ?? environment(description.groupEnvironment) ?? description.defaultGroup,
                                    metricsPrefix: description.metricsPrefix)
    settings.topic = kafka.topic
    settings.deadLetterTopic = kafka.deadLetterTopic
    settings.partitioner = try kafka.partitioner
    settings.batchSize = options.batchSize ?? description.defaultBatchSize
    settings.batchTimeout = .milliseconds(options.batchTimeoutMs)
    settings.statsInterval = .seconds(options.statsIntervalSeconds)
    settings.exitWhenCaughtUp = options.exitWhenCaughtUp

    // A consumer that applies credit checks it was signed (nil for one that applies none).
    let keyring = try creditKeys?.verifyingKeyring(logger: logger)

    let kafkaConfiguration = KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties)
        .groupMember(sessionTimeoutMs: options.sessionTimeoutMs)
    // One connection per commit lane (see `CommitLanes`), made before signals are caught.
    let connections = try (0..<options.commitLanes).map { _ in try database.connect(logger: logger) }
    let instanceID = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
    // Lane 0's connection is idle until the loop claims partitions, after this check.
    let layoutConnection = connections[0]
    let topic = settings.topic
    settings.checkLayout = { layout in try layout.check(topic: topic, on: layoutConnection) }
    if let keyring {
        // Filled as partitions are claimed (see `RaterStore`).
        settings.creditVerifier = CreditVerifier(keyring: keyring)
        logger.info("credit records are applied only when signed", metadata: ["credit_key_ids": "\(keyring.keys.map(\.id).joined(separator: ","))"])
    }
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
    let lanes = try connections.enumerated().map { lane, connection in
        try makeStore(ConsumerContext(connection: connection, lane: lane, kafka: kafkaConfiguration, settings: settings,
                                      instanceID: instanceID, logger: logger, stop: stop))
    }
    let laneStore = lanes.count == 1 ? lanes[0] : CommitLanes(lanes)
    let store = try decorate?(laneStore, settings, { try database.connect(logger: logger) }) ?? laneStore
    logger.info("starting", metadata: ["group": "\(settings.group)", "topic": "\(settings.topic)", "instance": "\(instanceID)"])
    let loop = try ConsumerLoop(kafka: kafkaConfiguration, store: store, settings: settings, logger: logger, stop: stop)
    let opsServer = try ops.start(registry: registry, logger: logger, ready: { loop.isReady })
    try loop.run()
    _ = opsServer
}
