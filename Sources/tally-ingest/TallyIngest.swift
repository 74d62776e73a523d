import ArgumentParser
import Logging
import TallyCLI
import TallyKafka

/// The producer shim. Its HTTP API (issue #3) is not built yet; today it checks its
/// settings and that the broker answers, so deployments can wire it up.
@main
struct TallyIngest: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tally-ingest",
        abstract: "Tally's ingest API: validates usage events and publishes them to the usage topic.",
        discussion: "Not built yet: this version only checks its settings and the broker, then exits 2.")

    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions

    func run() async throws {
        JSONLogHandler.bootstrap(service: "tally-ingest", level: logging.logLevel)
        let logger = Logger(label: "tally.ingest")
        let admin = try KafkaAdmin(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties), logger: logger)
        let partitions = try admin.partitionCount(of: kafka.topic)
        logger.error("the HTTP ingest API is not built yet; broker reachable, \(kafka.topic) has \(partitions) partitions")
        throw ExitCode(2)
    }
}
