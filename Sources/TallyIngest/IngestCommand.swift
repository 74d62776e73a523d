import ArgumentParser
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import Metrics
import NIOCore
import TallyCLI
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

private extension String {
    func trimmingSuffix(_ suffix: String) -> String { hasSuffix(suffix) ? String(dropLast(suffix.count)) : self }
}

/// Extra middleware for the ingest router, for tests (the fault suite's forced server errors);
/// production runs none.
public typealias IngestRouterDecorator = @Sendable (Router<BasicRequestContext>) -> Void

/// `tally-ingest`: the ingest API and LLM gateway, a Hummingbird application with graceful
/// shutdown. The executable is this command and nothing else.
public struct IngestCommand: AsyncParsableCommand {
    public init() {}

    public static let configuration = CommandConfiguration(
        commandName: "tally-ingest",
        abstract: "Tally's ingest API: validates usage events and publishes them to the usage topic.",
        discussion: """
            POST /v1/events takes one event, a JSON array, or NDJSON; POST /v1/usage/{provider} takes a \
            provider-native usage object (openai, openai-responses, anthropic, gemini, bedrock). An event is \
            answered accepted only after the broker acknowledged it (acks=all, idempotent producer). \
            With --openai-upstream and/or --anthropic-upstream it is also a gateway: POST /v1/chat/completions, \
            /v1/responses and /v1/messages are forwarded to the upstream with its own key (env TALLY_OPENAI_API_KEY, \
            TALLY_ANTHROPIC_API_KEY) after a credit check, and each call's reported usage becomes one usage event. \
            GET /livez, /readyz and /metrics serve operations. SIGTERM stops accepting, finishes requests \
            in flight, flushes the producer and exits 0.
            """)

    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var logging: LoggingOptions
    @OptionGroup var creditKeys: CreditKeyOptions

    @Option(help: "Address to listen on. Env: TALLY_INGEST_HOST. Default: 0.0.0.0.") var host: String?
    @Option(help: "Port to listen on (0 picks a free one, logged at start). Env: TALLY_INGEST_PORT. Default: 8080.") var port: Int?
    @Option(help: "Largest request body in bytes; larger bodies get 413 before parsing.") var maxBodyBytes = 1 << 20
    @Option(help: "Requests per second each API key may make (bursts of twice that); past it, 429 with Retry-After. 0: no limit.")
    var maxRequestsPerKeyPerSecond = 0
    @Option(help: "Most events in one request; more get 413.") var maxBatchEvents = 10_000
    @Option(help: "Oldest accepted event time, in days before now.") var maxEventAgeDays = 35
    @Option(help: "Latest accepted event time, in minutes after now.") var maxEventFutureMinutes = 5
    @Flag(help: "Accept requests without an API key. For local development only; never in production.") var allowAnonymous = false
    @Flag(help: "Serve /metrics without an API key (by default a scrape needs one, e.g. Prometheus' `authorization` setting).")
    var publicMetrics = false
    @Option(help: "Close a connection that sends no complete request head (or nothing at all) for this many seconds.")
    var idleTimeoutSeconds = 30
    @Option(help: "Most connections open at once; more wait in the listen backlog.") var maxConnections = 512

    public func validate() throws {
        guard idleTimeoutSeconds > 0, maxConnections > 0 else { throw ValidationError("--idle-timeout-seconds and --max-connections must be positive") }
        guard (1...64).contains(readConnections) else { throw ValidationError("--read-connections: 1 to 64") }
    }
    @Option(help: "How long the broker may take to acknowledge an event before it is answered `unknown` (503, resend with the same id). The default outlasts a Kafka controller fail-over (11–13 s measured).")
    var deliveryTimeoutMs = 30_000

    @Option(help: "Gateway: forward /v1/chat/completions and /v1/responses to this OpenAI-compatible base URL (e.g. https://api.openai.com). Env: TALLY_OPENAI_UPSTREAM; its key: TALLY_OPENAI_API_KEY.")
    var openaiUpstream: String?
    @Option(help: "Gateway: forward /v1/messages to this Anthropic-compatible base URL (e.g. https://api.anthropic.com). Env: TALLY_ANTHROPIC_UPSTREAM; its key: TALLY_ANTHROPIC_API_KEY.")
    var anthropicUpstream: String?
    @Option(help: "Gateway: a header naming the customer, trusted from keys that name no customer themselves.") var customerHeader: String?
    @Option(help: "The rater's consumer group, whose offsets say which calls its balances and budgets already hold (gateway, /v1/check).")
    var raterGroup = "tally-rater"
    @Option(help: "Gateway: output tokens reserved for a call whose request sets no maximum.") var defaultOutputTokens: Int64 = 4096
    @Option(help: "Gateway: for a customer whose overage policy can refuse, a call to a model no price book prices holds its tokens at this price per million tokens (the customer's currency), so it is never free. The usage itself is kept unbilled until the model is priced.")
    var unpricedModelPrice = "75"
    @Flag(help: "Gateway: refuse calls to unpriced models (402) for customers whose overage policy can refuse, instead of holding them at --unpriced-model-price.")
    var refuseUnpricedModels = false
    @Option(help: "Gateway: the longest wait for the upstream's response head or its next chunk.") var upstreamTimeoutSeconds = 600
    @Option(help: "Gateway: largest request body in bytes.") var gatewayMaxBodyBytes = 32 << 20
    @Option(help: "PostgreSQL connections for the read API (usage, balances, invoices…); reads beyond them wait their turn.")
    var readConnections = 4

    /// Grants and voids are signed with the keyring's `sign` key; without a keyring they are refused (503).
    func creditKeyring(logger: Logger) throws -> CreditKeyring? {
        guard creditKeys.path != nil else {
            logger.warning("no credit keys file (--credit-keys-file): grants and voids are refused with 503")
            return nil
        }
        return try creditKeys.signingKeyring(logger: logger)
    }

    /// The read API's connections; none without a database URL (its routes then answer 503). With
    /// --allow-anonymous, a database that does not answer leaves the ingest API running without them.
    func readPool(logger: Logger) throws -> ReadPool? {
        guard let url = try? database.databaseURL else { return nil }
        do {
            return try ReadPool(url: url, count: readConnections, logger: logger)
        } catch where allowAnonymous {
            logger.warning("the read API is off: \(error)")
            return nil
        }
    }

    public func run() async throws { try await run(decorate: { _ in }) }

    /// Runs the service with `decorate` applied to its router before it serves.
    public func run(decorate: IngestRouterDecorator) async throws {
        ProcessSetup.ignoreBrokenPipes()
        JSONLogHandler.bootstrap(service: "tally-ingest", level: logging.logLevel)
        let registry = OpsOptions.bootstrapMetrics()
        let logger = Logger(label: "tally.ingest")
        var properties = try kafka.extraProperties
        properties["message.timeout.ms"] = properties["message.timeout.ms"] ?? String(deliveryTimeoutMs)
        let kafkaConfiguration = KafkaConfiguration(brokers: try kafka.brokers, properties: properties)
        let admin = try KafkaAdmin(configuration: kafkaConfiguration, logger: logger)
        // An event the API accepts must not be one every consumer then refuses as too late.
        let horizon = try kafka.dedupHorizon
        guard maxEventAgeDays <= horizon.days else {
            throw ValidationError("--max-event-age-days \(maxEventAgeDays) accepts events the consumers refuse: the topic's dedup horizon is \(horizon) (--dedup-horizon-days)")
        }
        let parser = IngestBatchParser(maxEvents: maxBatchEvents,
                                       maxAgeMicroseconds: Int64(maxEventAgeDays) * 86_400_000_000,
                                       maxFutureMicroseconds: Int64(maxEventFutureMinutes) * 60_000_000)
        let authenticator = allowAnonymous ? nil
            : Authenticator(connection: try PostgresConnection(url: try database.databaseURL, logger: logger), logger: logger)
        if allowAnonymous { logger.warning("--allow-anonymous: accepting requests without an API key") }
        if !allowAnonymous {
            // Producing with another partitioner or partition count than the topic's recorded one
            // would split customers (see `TopicLayout`); an unreachable broker is readiness's concern.
            do {
                let partitions = Int32(try admin.partitionCount(of: kafka.topic, timeout: .seconds(10)))
                try TopicLayout(partitioner: try kafka.partitioner, partitions: partitions, dedupHorizon: horizon)
                    .check(topic: kafka.topic, on: try PostgresConnection(url: try database.databaseURL, logger: logger))
            } catch let error as KafkaError {
                logger.warning("the layout of \(kafka.topic) could not be checked (\(error)); consumers check it when they start")
            }
        }
        let grants = allowAnonymous ? nil
            : GrantRegistry(connection: try PostgresConnection(url: try database.databaseURL, logger: logger), logger: logger)
        let service = try IngestService(kafkaConfiguration: kafkaConfiguration, admin: admin, topic: kafka.topic, parser: parser,
                                        maxBodyBytes: maxBodyBytes, authenticator: authenticator, grants: grants,
                                        meters: allowAnonymous ? nil
                                            : MeterRegistry(connection: try PostgresConnection(url: try database.databaseURL, logger: logger, searchPath: "tally"),
                                                            logger: logger),
                                        rateLimiter: KeyRateLimiter(perSecond: maxRequestsPerKeyPerSecond),
                                        creditKeyring: try creditKeyring(logger: logger),
                                        budgets: allowAnonymous ? nil
                                            : BudgetGuard(connection: try PostgresConnection(url: try database.databaseURL, logger: logger, searchPath: "tally"),
                                                          topic: kafka.topic, raterGroup: raterGroup, logger: logger),
                                        readPool: try readPool(logger: logger),
                                        logger: logger)
        let router = Router()
        decorate(router)
        service.register(on: router, publicMetrics: publicMetrics, metrics: { registry.emitToString() })
        var gateway: Gateway?
        var upstreams: [GatewayAPI.Vendor: Gateway.Upstream] = [:]
        if let url = openaiUpstream ?? environment("TALLY_OPENAI_UPSTREAM") {
            upstreams[.openai] = Gateway.Upstream(baseURL: url.trimmingSuffix("/"), apiKey: environment("TALLY_OPENAI_API_KEY") ?? "")
        }
        if let url = anthropicUpstream ?? environment("TALLY_ANTHROPIC_UPSTREAM") {
            upstreams[.anthropic] = Gateway.Upstream(baseURL: url.trimmingSuffix("/"), apiKey: environment("TALLY_ANTHROPIC_API_KEY") ?? "")
        }
        for (vendor, upstream) in upstreams {
            guard let url = URL(string: upstream.baseURL + "/v1"), ["http", "https"].contains(url.scheme ?? ""), url.host != nil else {
                throw ValidationError("--\(vendor.rawValue)-upstream: \"\(upstream.displayURL)\" is no http(s) base URL")
            }
        }
        if !upstreams.isEmpty {
            let trustedHeader = try customerHeader.map { name in
                guard let field = HTTPField.Name(name) else { throw ValidationError("--customer-header: \"\(name)\" is no HTTP header name") }
                return field
            }
            guard let unpricedNanos = Money.nanos(unpricedModelPrice), unpricedNanos >= 0 else {
                throw ValidationError("--unpriced-model-price: \"\(unpricedModelPrice)\" is no non-negative decimal amount")
            }
            let credit = CreditGuard(connection: try PostgresConnection(url: try database.databaseURL, logger: logger, searchPath: "tally"),
                                     topic: kafka.topic, raterGroup: raterGroup,
                                     unpricedPolicy: refuseUnpricedModels ? .refuse : .hold(nanosPerMillionTokens: unpricedNanos), logger: logger)
            let proxy = Gateway(settings: .init(upstreams: upstreams, customerHeader: trustedHeader, defaultOutputTokens: defaultOutputTokens,
                                                  maxBodyBytes: gatewayMaxBodyBytes),
                                  service: service, client: UpstreamClient(idleTimeout: .seconds(upstreamTimeoutSeconds)), credit: credit, logger: logger)
            proxy.register(on: router)
            gateway = proxy
            for (vendor, upstream) in upstreams.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                logger.info("gateway: \(vendor.rawValue) calls go to \(upstream.displayURL)\(upstream.apiKey.isEmpty ? " (no upstream key set)" : "")")
            }
        }
        let listenHost = host ?? environment("TALLY_INGEST_HOST") ?? "0.0.0.0"
        let listenPort = port ?? environment("TALLY_INGEST_PORT").flatMap(Int.init) ?? 8080
        let app = Application(
            router: router,
            // Silent connections and ones trickling a request head are closed after the idle timeout.
            server: .http1(configuration: .init(idleTimeout: .seconds(Int64(idleTimeoutSeconds)))),
            configuration: .init(address: .hostname(listenHost, port: listenPort), serverName: "tally-ingest",
                                 availableConnectionsDelegate: .maximum(maxConnections, logger: logger)),
            onServerRunning: { channel in
                logger.info("listening on http://\(listenHost):\(channel.localAddress?.port ?? listenPort)")
            },
            logger: logger)
        // Stops accepting on SIGTERM/SIGINT and returns once requests in flight are answered.
        try await app.runService(gracefulShutdownSignals: [.sigterm, .sigint])
        // Answered gateway calls publish their events after the answer: let them land first.
        await gateway?.drain(timeout: .seconds(30))
        await service.producer.close(flushTimeout: .seconds(30))
        logger.info("stopped; producer flushed")
    }
}
