import ArgumentParser
import TallyPipeline

/// `tally-aggregator`: its flags and its run, here so a test build can run the same command with
/// its store decorated (`run(decorate:)`; see `TallyTesting.ConsumerFaults`).
public struct AggregatorCommand: DecoratableConsumerCommand {
    public static let configuration = CommandConfiguration(
        commandName: "tally-aggregator",
        abstract: "Tally's dedup/aggregation consumer: exactly-once usage windows in PostgreSQL.",
        discussion: """
            Reads the usage topic in a consumer group, drops duplicates by (customer, event id) and keeps \
            hourly, daily and monthly usage windows. Each batch's effect and its offsets commit in one \
            PostgreSQL transaction; offsets are fenced by an owner epoch. Start more instances with the \
            same group to scale out. SIGTERM finishes the batch, commits, leaves the group and exits 0. \
            Env: TALLY_AGGREGATOR_GROUP sets the group.
            """)

    @OptionGroup var consumer: ConsumerOptions
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @OptionGroup var ops: OpsOptions

    @Option(help: "Fold window deltas into the hourly windows once this many rows wait (and whenever idle).")
    var windowFoldRows = 200_000

    public init() {}

    public func validate() throws {
        guard windowFoldRows > 0 else { throw ValidationError("--window-fold-rows must be positive") }
    }

    public func run() async throws { try await run(decorate: nil) }

    /// - Parameter decorate: wraps the consumer's store (test builds only; production passes nil).
    public func run(decorate: StoreDecorator?) async throws {
        let description = ConsumerDescription(service: "tally-aggregator", defaultGroup: "tally-aggregator",
                                              groupEnvironment: "TALLY_AGGREGATOR_GROUP", metricsPrefix: "tally_aggregator")
        // One folder for all lanes, on a connection of its own.
        var folder: WindowFolder?
        try await runConsumer(description, options: consumer, database: database, kafka: kafka, logging: logging, ops: ops, decorate: decorate) { context in
            let shared = try folder ?? WindowFolder(connection: database.connect(logger: context.logger))
            folder = shared
            return AggregatorStore(connection: context.connection, group: context.settings.group, topic: context.settings.topic,
                                   instanceID: context.instanceID, folder: shared, foldThreshold: windowFoldRows)
        }
    }
}
