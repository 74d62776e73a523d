import ArgumentParser
import Logging
import TallyCLI
import TallyKafka
import TallyPostgres

/// The rating/wallet consumer. Rating (issue #5) is not built yet; today it checks
/// its settings, the broker and the database, then exits.
@main
struct TallyRater: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tally-rater",
        abstract: "Tally's rating consumer: prices usage, debits wallets, builds invoices.",
        discussion: "Not built yet: this version only checks its settings, the broker and the database, then exits 2.")

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions

    func run() async throws {
        JSONLogHandler.bootstrap(service: "tally-rater", level: logging.logLevel)
        let logger = Logger(label: "tally.rater")
        _ = try PostgresConnection(url: try database.databaseURL, logger: logger)
        let admin = try KafkaAdmin(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties), logger: logger)
        _ = try admin.partitionCount(of: kafka.topic)
        logger.error("rating is not built yet; broker and database reachable")
        throw ExitCode(2)
    }
}
