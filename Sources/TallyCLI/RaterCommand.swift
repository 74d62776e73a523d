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
            transaction. Low-balance alerts and top-up requests are published to the alerts topic after commit, \
            and they and closed invoices are delivered to the webhook endpoints (tally webhooks add) as signed JSON. \
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

    @Option(help: "Deliver webhooks ('on' or 'off'; off leaves them waiting for a rater that does).")
    var webhooks = "on"

    @Option(help: "Seconds before a failed webhook delivery is tried again; doubles after each attempt, at most 6 hours apart.")
    var webhookRetrySeconds = 5.0

    @Option(help: "Attempts of a webhook delivery before it is failed (tally webhooks resend starts it again).")
    var webhookAttempts = 18

    @Option(help: "Seconds a webhook endpoint has to answer an attempt.")
    var webhookTimeoutSeconds = 10.0

    public init() {}

    public func validate() throws {
        guard ["on", "off"].contains(webhooks) else { throw ValidationError("--webhooks: on or off, not \(webhooks)") }
        guard webhookRetrySeconds > 0, webhookRetrySeconds <= 86_400, (1...100).contains(webhookAttempts), webhookTimeoutSeconds > 0, webhookTimeoutSeconds <= 300 else {
            throw ValidationError("--webhook-retry-seconds must be in (0, 86400], --webhook-attempts 1 to 100, --webhook-timeout-seconds in (0, 300]")
        }
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
                              creditKeys: creditKeys, decorate: decorate, helpers: { try relay(kafka: $0, logger: $1) + webhookSender(logger: $1) }) { context in
            RaterStore(connection: context.connection, group: context.settings.group, topic: context.settings.topic,
                       instanceID: context.instanceID, logger: context.logger, creditHorizon: context.settings.creditVerifier?.horizon)
        }
    }

    /// The webhook sender beside the loop, on a connection of its own.
    private func webhookSender(logger: Logger) throws -> [any Service] {
        guard webhooks == "on" else { return [] }
        let sender = WebhookSender(connection: try database.connect(logger: logger),
                                   policy: WebhookRetryPolicy(first: .milliseconds(Int64(webhookRetrySeconds * 1000)), attempts: webhookAttempts),
                                   timeout: .milliseconds(Int64(webhookTimeoutSeconds * 1000)), logger: logger)
        let stop = SharedFlag()
        return [ThreadService(description: "tally.webhooks", stop: stop) { sender.run(stop: stop) }]
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
