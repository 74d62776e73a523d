import ArgumentParser
import Dispatch
import Foundation
import TallyCore
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

    public func run() throws { try run(decorate: nil) }

    /// - Parameter decorate: wraps the consumer's store (test builds only; production passes nil).
    public func run(decorate: StoreDecorator?) throws {
        let description = ConsumerDescription(service: "tally-rater", defaultGroup: "tally-rater",
                                              groupEnvironment: "TALLY_RATER_GROUP", metricsPrefix: "tally_rater")
        var relayStop: SharedFlag?
        let relayDone = DispatchSemaphore(value: 0)
        try runConsumer(description, options: consumer, database: database, kafka: kafka, logging: logging, ops: ops,
                        creditKeys: creditKeys, decorate: decorate) { context in
            if alertsTopic != "off" && context.lane == 0 {
                // The relay has its own connection: it must not share the batch transaction's.
                let relay = AlertRelay(connection: try database.connect(logger: context.logger),
                                       producer: try BlockingProducer(configuration: context.kafka, logger: context.logger),
                                       topic: alertsTopic, logger: context.logger)
                let stop = context.stop
                let grace = closeInvoicesAfterGraceHours.map { Duration.seconds(Int64($0) * 3600) }
                let logger = context.logger
                let thread = Thread {
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
                    relayDone.signal()
                }
                thread.name = "tally.alert-relay"
                thread.start()
                relayStop = stop
            }
            return RaterStore(connection: context.connection, group: context.settings.group, topic: context.settings.topic,
                              instanceID: context.instanceID, logger: context.logger, creditHorizon: context.settings.creditVerifier?.horizon)
        }
        // The loop ended (signal or caught up): let the relay publish what the last batches committed.
        if let relayStop {
            relayStop.set()
            _ = relayDone.wait(timeout: .now() + 30)
        }
    }
}
