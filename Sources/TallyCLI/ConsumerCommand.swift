import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
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

/// Everything a consumer's store needs to be built.
public struct ConsumerContext {
    /// This lane's own connection (see `CommitLanes`).
    public let connection: PostgresConnection
    public let settings: ConsumerSettings
    public let instanceID: String
    public let logger: Logger
}

/// Wraps a consumer's whole store (every commit lane) before the loop runs. Test builds pass
/// TallyTesting's fault decorators (`tally-faults`); the production executables pass none. Gets
/// the loop's settings and a way to open another PostgreSQL connection.
public typealias StoreDecorator = (_ store: any ConsumerStore, _ settings: ConsumerSettings,
                                   _ connect: () throws -> PostgresConnection) throws -> any ConsumerStore

/// A consumer executable's command whose store a test build may decorate (`tally-faults`).
public protocol DecoratableConsumerCommand: AsyncParsableCommand {
    func run(decorate: StoreDecorator?) async throws
}

/// Runs a consumer until SIGTERM/SIGINT (or caught up): settings from flags and the environment,
/// metrics, PostgreSQL connections, and a service group of the consumer loop, the ops endpoint
/// and `helpers` (the rater's alert relay). On a signal the loop finishes its batch and leaves
/// the group first, then the ops endpoint stops, then the helpers (in reverse order of start).
/// - Parameter helpers: more services, given the Kafka settings and the logger; they stop last.
public func runConsumer(_ description: ConsumerDescription, options: ConsumerOptions, database: DatabaseOptions, kafka: KafkaOptions,
                        logging: LoggingOptions, ops: OpsOptions, creditKeys: CreditKeyOptions? = nil, decorate: StoreDecorator? = nil,
                        helpers: (KafkaConfiguration, Logger) throws -> [any Service] = { _, _ in [] },
                        makeStore: (ConsumerContext) throws -> any ConsumerStore) async throws {
    ProcessSetup.ignoreBrokenPipes()
    JSONLogHandler.bootstrap(service: description.service, level: logging.logLevel)
    let registry = OpsOptions.bootstrapMetrics()
    let logger = Logger(label: "tally.\(description.service)")
    var settings = ConsumerSettings(group: options.group ?? environment(description.groupEnvironment) ?? description.defaultGroup,
                                    metricsPrefix: description.metricsPrefix)
    settings.topic = kafka.topic
    settings.deadLetterTopic = kafka.deadLetterTopic
    settings.partitioner = try kafka.partitioner
    settings.dedupHorizon = try kafka.dedupHorizon
    settings.batchSize = options.batchSize ?? description.defaultBatchSize
    settings.batchTimeout = .milliseconds(options.batchTimeoutMs)
    settings.statsInterval = .seconds(options.statsIntervalSeconds)
    settings.exitWhenCaughtUp = options.exitWhenCaughtUp

    // A consumer that applies credit checks it was signed (nil for one that applies none).
    let keyring = try creditKeys?.verifyingKeyring(logger: logger)

    let kafkaConfiguration = KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties)
        .groupMember(sessionTimeoutMs: options.sessionTimeoutMs)
    // One connection per commit lane (see `CommitLanes`).
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
    let lanes = try connections.map { connection in
        try makeStore(ConsumerContext(connection: connection, settings: settings,
                                      instanceID: instanceID, logger: logger))
    }
    let laneStore = lanes.count == 1 ? lanes[0] : CommitLanes(lanes)
    let store = try decorate?(laneStore, settings, { try database.connect(logger: logger) }) ?? laneStore
    logger.info("starting", metadata: ["group": "\(settings.group)", "topic": "\(settings.topic)", "instance": "\(instanceID)"])
    let loop = try ConsumerLoop(kafka: kafkaConfiguration, store: store, settings: settings, logger: logger, stop: stop)

    var services = try helpers(kafkaConfiguration, logger).map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) }
    let endpoint = try ops.endpoint(service: description.service, registry: registry, logger: logger, ready: { loop.isReady })
    if let endpoint {
        // It returns early only when it failed after serving (logged): the consumer goes on.
        services.append(.init(service: endpoint, successTerminationBehavior: .ignore))
    }
    // The loop's own end (--exit-when-caught-up) stops the others gracefully: the relay's last
    // pass still publishes what the last batches committed. It claims no partition before the
    // ops endpoint listens: an address that cannot be bound ends the process first.
    services.append(.init(service: ThreadService(description: "tally.consumer", stop: stop,
                                                 onStop: { logger.info("stopping: finishing the batch and leaving the group") },
                                                 body: {
                                                     guard endpoint?.started.wait() ?? true else { return }
                                                     try loop.run()
                                                 }),
                          successTerminationBehavior: .gracefullyShutdownGroup))
    // The group's own lines (each service starting and stopping) are noise beside the consumer's.
    var quiet = logger
    quiet.logLevel = .warning
    try await ServiceGroup(configuration: ServiceGroupConfiguration(services: services, gracefulShutdownSignals: [.sigterm, .sigint],
                                                                    logger: quiet)).run()
}
