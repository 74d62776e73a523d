import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import TallyCore
import TallyKafka
import TallyPipeline

/// `tally-rater`: its flags and its run, here so a test build can run the same command with its
/// store decorated (`run(decorate:)`; see `TallyTesting.ConsumerFaults`).
public struct RaterCommand: DecoratableConsumerCommand {
    public static let configuration = CommandConfiguration(
        commandName: "tally-rater",
        abstract: "Tally's rating/wallet consumer: prices usage, debits prepaid wallets, raises alerts.",
        discussion: """
            Reads the usage topic in its own consumer group (tally-rater) with its own offsets and dedup keys. \
            Usage is priced with the price book version in force at its event time (tally pricing apply); \
            wallet grants (type tally.wallet.grant) credit wallets when signed with a key of the credit keyring \
            (--credit-keys-file; unsigned or forged ones are dead-lettered as unsigned_credit); charges debit them by grant priority, then \
            earliest expiry. Every batch's ledger entries, rated totals and offsets commit in one PostgreSQL \
            transaction. Low-balance alerts and top-up requests are published to the alerts topic after commit. \
            Env: TALLY_RATER_GROUP sets the group.
            """)

    @OptionGroup var consumer: ConsumerOptions
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @OptionGroup var ops: OpsOptions
    @OptionGroup var creditKeys: CreditKeyOptions

    @Option(help: "Topic for low-balance alerts and top-up requests ('off' keeps them in PostgreSQL only). Default: tally.alerts.")
    var alertsTopic = "tally.alerts"

    @Option(help: "Close each customer's billing period into an invoice once the latest rated event time is this many hours past the period end (off when omitted; see tally invoices close).")
    var closeInvoicesAfterGraceHours: Int?

    public init() {}

    public func validate() throws {
        if let hours = closeInvoicesAfterGraceHours, hours < 0 { throw ValidationError("--close-invoices-after-grace-hours must be 0 or more") }
        if closeInvoicesAfterGraceHours != nil && alertsTopic == "off" {
            throw ValidationError("--close-invoices-after-grace-hours runs beside the alert relay; it needs --alerts-topic")
        }
    }

    public func run() async throws { try await run(decorate: nil) }

    /// - Parameter decorate: wraps the consumer's store (test builds only; production passes nil).
    public func run(decorate: StoreDecorator?) async throws {
        let description = ConsumerDescription(service: "tally-rater", defaultGroup: "tally-rater",
                                              groupEnvironment: "TALLY_RATER_GROUP", metricsPrefix: "tally_rater")
        try await runConsumer(description, options: consumer, database: database, kafka: kafka, logging: logging, ops: ops,
                              creditKeys: creditKeys, decorate: decorate, helpers: relay) { context in
            RaterStore(connection: context.connection, group: context.settings.group, topic: context.settings.topic,
                       instanceID: context.instanceID, logger: context.logger, creditHorizon: context.settings.creditVerifier?.horizon)
        }
    }

    /// The alert relay (and, with a grace period, the invoice closer) as a service beside the loop;
    /// it has its own connection: it must not share a batch transaction's.
    private func relay(kafka: KafkaConfiguration, logger: Logger) throws -> [any Service] {
        guard alertsTopic != "off" else { return [] }
        let relay = AlertRelay(connection: try database.connect(logger: logger),
                               producer: try BlockingProducer(configuration: kafka, logger: logger),
                               topic: alertsTopic, logger: logger)
        let grace = closeInvoicesAfterGraceHours.map { Duration.seconds(Int64($0) * 3600) }
        let stop = SharedFlag()
        return [ThreadService(description: "tally.alert-relay", stop: stop) {
            // A refused invoice is tried again every pass: said once per process, not every second.
            var refusalsLogged = Set<String>()
            relay.run(stop: stop, eachPass: grace.map { grace in
                { connection in
                    let closing = try InvoiceStore(connection: connection).closeDue(grace: grace)
                    for invoice in closing.closed {
                        logger.info("closed \(invoice.invoiceID): total due \(invoice.currency.format(invoice.totalDueNanos)) \(invoice.currency)")
                    }
                    // The other customers' periods closed; this one stays open.
                    for reason in closing.refused where refusalsLogged.insert(reason).inserted {
                        logger.error("invoice not closed: \(reason)")
                    }
                }
            })
        }]
    }
}
