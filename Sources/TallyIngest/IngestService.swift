import Foundation
import HTTPTypes
import Hummingbird
import Logging
import Metrics
import NIOCore
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

/// The HTTP handlers of the ingest API.
final class IngestService: Sendable {
    private let producerBox: ProducerBox
    let kafkaConfiguration: KafkaConfiguration
    let admin: KafkaAdmin
    let topic: String
    let parser: IngestBatchParser
    let maxBodyBytes: Int
    let logger: Logger
    /// nil only with --allow-anonymous (local development).
    let authenticator: Authenticator?
    /// Checks a grant's id against the grants credited (nil without a database: --allow-anonymous).
    let grants: GrantRegistry?
    /// Refuses events naming meters the catalog does not declare; nil accepts any (`--allow-anonymous`).
    let meters: MeterRegistry?
    /// Requests per second per API key (nil: no limit).
    let rateLimiter: KeyRateLimiter?
    /// Signs grants and voids (nil: this instance publishes no credit; see `CreditKeyring`).
    let creditKeyring: CreditKeyring?
    /// Budgets for `/v1/check` and the gateway (nil without a database: --allow-anonymous).
    let budgets: BudgetGuard?
    /// Connections for the read API (nil without a database URL: read routes answer 503).
    let readPool: ReadPool?

    let requests = Counter(label: "tally_ingest_requests_total")
    let accepted = Counter(label: "tally_ingest_events_accepted_total")
    let duplicates = Counter(label: "tally_ingest_events_duplicate_in_request_total")
    let notWritten = Counter(label: "tally_ingest_events_not_written_total")
    /// Sent but not confirmed in time: perhaps written (a resend with the same id is deduplicated).
    let unconfirmed = Counter(label: "tally_ingest_events_unknown_total")
    let produceLatency = Metrics.Timer(label: "tally_ingest_produce_seconds")
    /// One counter per rejection reason, made once.
    private let rejected: [RejectionReason: Counter] = Dictionary(uniqueKeysWithValues: RejectionReason.allCases.map {
        ($0, Counter(label: "tally_ingest_events_rejected_total", dimensions: [("reason", $0.rawValue)]))
    })

    enum RejectionReason: String, CaseIterable {
        case unauthorized, bodyTooLarge = "body_too_large", malformedJSON = "malformed_json", tooManyEvents = "too_many_events"
        case malformed, timeWindow = "time_window", invalid, rateLimited = "rate_limited"
    }

    /// The current producer; replaced when it hits a fatal error.
    private final class ProducerBox: @unchecked Sendable {
        let lock = NSLock()
        var producer: KafkaProducer
        init(_ producer: KafkaProducer) { self.producer = producer }
    }

    var producer: KafkaProducer { producerBox.lock.withLock { producerBox.producer } }

    init(kafkaConfiguration: KafkaConfiguration, admin: KafkaAdmin, topic: String, parser: IngestBatchParser, maxBodyBytes: Int,
         authenticator: Authenticator?, grants: GrantRegistry?, meters: MeterRegistry? = nil, rateLimiter: KeyRateLimiter?,
         creditKeyring: CreditKeyring?, budgets: BudgetGuard? = nil, readPool: ReadPool? = nil, logger: Logger) throws {
        self.kafkaConfiguration = kafkaConfiguration
        self.readPool = readPool
        self.budgets = budgets
        self.creditKeyring = creditKeyring
        self.authenticator = authenticator
        self.grants = grants
        self.meters = meters
        self.rateLimiter = rateLimiter
        producerBox = ProducerBox(try KafkaProducer(configuration: kafkaConfiguration, logger: logger))
        self.admin = admin
        self.topic = topic
        self.parser = parser
        self.maxBodyBytes = maxBodyBytes
        self.logger = logger
    }

    /// - Parameter publicMetrics: serve `/metrics` without an API key (otherwise a scrape needs one).
    func register(on router: Router<BasicRequestContext>, publicMetrics: Bool, metrics: @escaping @Sendable () -> String) {
        router.post("v1/events") { request, _ in
            try await self.authenticated(request, scopes: [.ingest]) { key in try await self.events(request, key: key) }
        }
        router.post("v1/usage/:provider") { request, context in
            try await self.authenticated(request, scopes: [.ingest]) { key in
                try await self.providerUsage(request, provider: context.parameters.get("provider") ?? "", key: key)
            }
        }
        router.post("v1/wallets/:customer/grants") { request, context in
            try await self.authenticated(request) { key in
                guard let customer = Self.pathSegment(context.parameters.get("customer")) else { return self.badPath() }
                return try await self.grant(request, customer: customer, key: key)
            }
        }
        router.post("v1/wallets/:customer/grants/:grant/void") { request, context in
            try await self.authenticated(request) { key in
                guard let customer = Self.pathSegment(context.parameters.get("customer")),
                      let grantID = Self.pathSegment(context.parameters.get("grant")) else { return self.badPath() }
                return try await self.voidGrant(request, customer: customer, grantID: grantID, key: key)
            }
        }
        for removed in [false, true] {
            let handler: @Sendable (Request, BasicRequestContext) async throws -> Response = { request, context in
                try await self.authenticated(request) { key in
                    guard let customer = Self.pathSegment(context.parameters.get("customer")),
                          let budget = Self.pathSegment(context.parameters.get("budget")) else { return self.badPath() }
                    return try await self.declareBudget(request, customer: customer, budget: budget, removed: removed, key: key)
                }
            }
            if removed { router.delete("v1/customers/:customer/budgets/:budget", use: handler) } else { router.put("v1/customers/:customer/budgets/:budget", use: handler) }
        }
        registerBudgetRoutes(on: router)
        registerReadRoutes(on: router)
        registerConsoleRoutes(on: router)
        router.get("livez") { _, _ in Response(status: .ok, headers: [.contentType: "text/plain"], body: .init(byteBuffer: ByteBuffer(string: "ok\n"))) }
        router.get("readyz") { _, _ in
            // Ready when the broker answers for our topic and the key database answers.
            let broker = await self.admin.topicIsReachable(self.topic)
            let database = await self.authenticator?.databaseReachable() ?? true
            let text = broker && database ? "ready\n" : "not ready:\(broker ? "" : " broker unreachable")\(database ? "" : " database unreachable")\n"
            return Response(status: broker && database ? .ok : .serviceUnavailable, headers: [.contentType: "text/plain"],
                            body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        router.get("metrics") { request, _ in
            @Sendable func scrape() -> Response {
                Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                         body: .init(byteBuffer: ByteBuffer(string: metrics())))
            }
            if publicMetrics { return scrape() }
            return try await self.authenticated(request) { key in
                // Operators' keys only: a customer's key may sit in that customer's own application.
                if let owner = key?.customerID {
                    return self.problem(.forbidden, "forbidden", "a key of customer \"\(owner)\" may not read the metrics; use a key of no customer")
                }
                return scrape()
            }
        }
    }

    /// A path segment percent-decoded once (`acme%20corp` is the customer `acme corp`); nil when
    /// it is missing or not valid percent-encoded UTF-8.
    static func pathSegment(_ raw: String?) -> String? {
        guard let raw, !raw.isEmpty, let decoded = raw.removingPercentEncoding, !decoded.isEmpty else { return nil }
        return decoded
    }

    func badPath() -> Response {
        problem(.badRequest, "invalid path", "a path segment is empty or not valid percent-encoded UTF-8")
    }

    /// A grant key limited to a customer (`tally keys create --grants --customer C`) grants to C only.
    func mayGrant(_ key: APIKeyRecord?, to customer: String, what: String = "grant or void credit") -> Response? {
        guard creditKeyring != nil else {
            return problem(.serviceUnavailable, "credit signing not configured",
                           "this tally-ingest holds no credit signing key, and the rater applies only signed credit: start it with --credit-keys-file (docs/security.md)")
        }
        guard let key else { return nil }
        if !key.mayGrant {
            return problem(.forbidden, "forbidden", "this API key may not \(what); create one with: tally keys create --grants")
        }
        if let owner = key.customerID, owner != customer {
            return problem(.forbidden, "forbidden", "this API key may only \(what) of customer \"\(owner)\"")
        }
        return nil
    }

    /// Runs `handler` for a request with a live API key holding one of `scopes` (any scope when
    /// empty; admin keys hold every scope), or any request with --allow-anonymous.
    func authenticated(_ request: Request, scopes: [APIScope] = [], vendor: GatewayAPI.Vendor? = nil,
                       _ handler: (APIKeyRecord?) async throws -> Response) async throws -> Response {
        guard let authenticator else { return try await handler(nil) }
        // Anthropic's clients send their key as x-api-key.
        let authorization = request.headers[.authorization] ?? request.headers[HTTPField.Name("x-api-key")!].map { "Bearer \($0)" }
        switch await authenticator.check(authorization: authorization) {
        case .allowed(let key):
            if let wait = rateLimiter?.wait(for: key.keyID) {
                rejectedCounter(.rateLimited).increment()
                var headers = HTTPFields()
                headers[.retryAfter] = String(max(1, Int(wait.totalSeconds.rounded(.up))))
                return problem(.tooManyRequests, "too many requests", "this API key is limited to its share of requests per second; retry after the Retry-After seconds",
                               headers: headers, vendor: vendor)
            }
            if !scopes.isEmpty && !scopes.contains(where: key.allows) {
                let names = scopes.map(\.rawValue).joined(separator: " or ")
                return problem(.forbidden, "forbidden", "this API key lacks the \(names) scope; create one with: tally keys create --scope \(scopes[0].rawValue)",
                               extra: [("required_scopes", .array(scopes.map { .string($0.rawValue) }))], vendor: vendor)
            }
            return try await handler(key)
        case .denied:
            rejectedCounter(.unauthorized).increment()
            var headers = HTTPFields()
            headers[.wwwAuthenticate] = "Bearer"
            return problem(.unauthorized, "unauthorized", "send Authorization: Bearer <API key> (tally keys create)", headers: headers, vendor: vendor)
        case .unavailable:
            var headers = HTTPFields()
            headers[.retryAfter] = "5"
            return problem(.serviceUnavailable, "key database unavailable", "API keys cannot be checked right now", headers: headers, vendor: vendor)
        }
    }

    private func rejectedCounter(_ reason: RejectionReason) -> Counter {
        rejected[reason]!
    }

    func body(_ request: Request, limit: Int? = nil) async throws -> [UInt8]? {
        do {
            let buffer = try await request.body.collect(upTo: limit ?? maxBodyBytes)
            return Array(buffer.readableBytesView)
        } catch let error as HTTPResponseError where error.status == .contentTooLarge {
            return nil
        }
    }

    func events(_ request: Request, key: APIKeyRecord?) async throws -> Response {
        requests.increment()
        // Structured mode wins when the content type says so (CloudEvents HTTP binding §3.3).
        if request.headers[HTTPField.Name("ce-specversion")!] != nil,
           !(request.headers[.contentType] ?? "").lowercased().hasPrefix("application/cloudevents") {
            return try await binaryModeEvent(request, key: key)
        }
        guard let format = IngestBodyFormat(contentType: request.headers[.contentType] ?? "application/json") else {
            return problem(.unsupportedMediaType, "unsupported content type",
                           "use application/json, application/cloudevents+json, application/cloudevents-batch+json or application/x-ndjson")
        }
        guard let body = try await body(request) else {
            rejectedCounter(.bodyTooLarge).increment()
            return problem(.contentTooLarge, "request body too large", "the limit is \(maxBodyBytes) bytes")
        }
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        switch parser.parse(body, format: format, nowMicroseconds: now) {
        case .failure(.malformed(let error)):
            rejectedCounter(.malformedJSON).increment()
            return problem(.badRequest, "malformed JSON", error.description, extra: [("position", .number(Int64(error.offset)))])
        case .failure(.tooManyEvents(let count, let limit)):
            rejectedCounter(.tooManyEvents).increment()
            return problem(.contentTooLarge, "too many events", "\(count) events in one request; the limit is \(limit)")
        case .failure(.empty):
            return problem(.badRequest, "no events", "the request holds no event")
        case .success(let outcomes):
            let isSingle = format == .json && body.first(where: { ![0x20, 0x09, 0x0a, 0x0d].contains($0) }) != UInt8(ascii: "[")
            return await publish(await refusingUndeclaredMeters(limited(outcomes, to: key)), single: isSingle)
        }
    }

    /// One CloudEvent in HTTP binary mode (CloudEvents HTTP protocol binding §3.1): attributes in
    /// `ce-*` headers (percent-encoded), `Content-Type` the data's media type, the body the data.
    /// Validated exactly as its structured equivalent; errors name the header at fault.
    func binaryModeEvent(_ request: Request, key: APIKeyRecord?) async throws -> Response {
        guard let body = try await body(request, limit: EventLimits.maxEventBytes) else {
            rejectedCounter(.bodyTooLarge).increment()
            return problem(.contentTooLarge, "request body too large", "a binary-mode event's data is at most \(EventLimits.maxEventBytes) bytes")
        }
        var attributes: [(name: String, value: String)] = []
        for field in request.headers where field.name.canonicalName.hasPrefix("ce-") {
            attributes.append((String(field.name.canonicalName.dropFirst(3)), field.value.removingPercentEncoding ?? field.value))
        }
        let document = BinaryModeEvent.structuredDocument(attributes: attributes, contentType: request.headers[.contentType],
                                                          data: body, binding: .http)
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        switch document.flatMap({ parser.parse($0, format: .json, nowMicroseconds: now).mapError { .invalid([FieldViolation("", "\($0)")]) } }) {
        case .failure(let error):
            return await publish([.rejected(error.violations)], single: true)
        case .success(let outcomes):
            let attributed = outcomes.map { outcome -> IngestOutcome in
                guard case .rejected(let violations) = outcome else { return outcome }
                return .rejected(BinaryModeEvent.attributed(violations, binding: .http))
            }
            return await publish(await refusingUndeclaredMeters(limited(attributed, to: key)), single: true)
        }
    }

    func providerUsage(_ request: Request, provider name: String, key: APIKeyRecord?) async throws -> Response {
        requests.increment()
        guard let provider = UsageProvider(rawValue: name) else {
            return problem(.notFound, "unknown provider", "providers: \(UsageProvider.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard let body = try await body(request) else {
            return problem(.contentTooLarge, "request body too large", "the limit is \(maxBodyBytes) bytes")
        }
        switch ProviderEventBuilder.build(provider, body: body) {
        case .failure(let error):
            return await publish([.rejected(error.violations)], single: true)
        case .success(let canonical):
            let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
            // Validated by the same rules as /v1/events, the time window included.
            switch parser.parse(canonical, format: .json, nowMicroseconds: now) {
            case .success(let outcomes): return await publish(limited(outcomes, to: key), single: true)
            case .failure: return problem(.badRequest, "invalid event", "the canonical event could not be read back")
            }
        }
    }

    /// Publishes one wallet grant; answers 202 only once the broker acknowledged it.
    func grant(_ request: Request, customer: String, key: APIKeyRecord?) async throws -> Response {
        requests.increment()
        if let refusal = mayGrant(key, to: customer) { return refusal }
        guard let body = try await body(request) else {
            return problem(.contentTooLarge, "request body too large", "the limit is \(maxBodyBytes) bytes")
        }
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        switch GrantRequest.event(customerID: customer, body: body, nowMicroseconds: now) {
        case .failure(let error):
            return fieldErrors("invalid grant", error.description, error.violations)
        case .success(let (grant, bytes)):
            if let violation = parser.timeViolation(grant.time, nowMicroseconds: now) {
                return fieldErrors("invalid grant", violation.description, [violation])
            }
            switch await grants?.check(grant) {
            case .conflicting(let stored)?:
                return problem(.conflict, "grant id already used",
                               "grant \(grant.id) of \(customer) was credited as \(stored); a grant id names one grant: send another id for other terms",
                               extra: [("id", .string(grant.id))])
            case .unavailable?:
                var headers = HTTPFields()
                headers[.retryAfter] = "5"
                return problem(.serviceUnavailable, "grant database unavailable", "the grant could not be checked; resend it", headers: headers)
            case .publish?, nil: break
            }
            switch await publishOne(signedCredit(customer, bytes)) {
            case .success(let report):
                logger.info("grant \(grant.id) of \(Money.format(nanos: grant.amountNanos)) \(grant.currency) for \(customer) accepted")
                return json(.accepted, .object([("id", .string(grant.id)), ("status", .string("accepted")),
                                                 ("amount", .string(Money.format(nanos: grant.amountNanos))), ("currency", .string(grant.currency.code)),
                                                 ("partition", .number(Int64(report.partition))), ("offset", .number(report.offset))]))
            case .failure(let error):
                var headers = HTTPFields()
                headers[.retryAfter] = "5"
                return problem(.serviceUnavailable, "broker unavailable",
                               "the grant was not written (\(error)); resend it: its id makes that safe", headers: headers)
            }
        }
    }

    /// Publishes a `tally.wallet.grant.void` for `grantID`; its id is `void-<grant id>`, so a retry
    /// voids once. Body (optional): `{"reason": "...", "time": "..."}`. Answers 202 once the broker
    /// acknowledged it; the rater then writes off what is left of the grant.
    func voidGrant(_ request: Request, customer: String, grantID: String, key: APIKeyRecord?) async throws -> Response {
        requests.increment()
        if let refusal = mayGrant(key, to: customer) { return refusal }
        guard let body = try await body(request, limit: 8 * 1024) else {
            return problem(.contentTooLarge, "request body too large", "a void's body is at most 8 KiB")
        }
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        switch GrantVoidRequest.event(customerID: customer, grantID: grantID, body: body, nowMicroseconds: now) {
        case .failure(let error):
            return fieldErrors("invalid void", error.description, error.violations)
        case .success(let (void, bytes)):
            if let violation = parser.timeViolation(void.time, nowMicroseconds: now) {
                return fieldErrors("invalid void", violation.description, [violation])
            }
            switch await publishOne(signedCredit(customer, bytes)) {
            case .success(let report):
                logger.info("void \(void.id) of grant \(grantID) for \(customer) accepted")
                return json(.accepted, .object([("id", .string(void.id)), ("grant_id", .string(grantID)), ("status", .string("accepted")),
                                                 ("partition", .number(Int64(report.partition))), ("offset", .number(report.offset))]))
            case .failure(let error):
                var headers = HTTPFields()
                headers[.retryAfter] = "5"
                return problem(.serviceUnavailable, "broker unavailable",
                               "the void was \(error.code == .deliveryUnknown ? "perhaps not" : "not") written (\(error)); resend it: its id makes that safe",
                               headers: headers)
            }
        }
    }

    /// Publishes a `tally.budget` declaring (PUT) or removing (DELETE) a budget; answers 202 once
    /// the broker acknowledged it. The rater counts the customer's usage after it in the log.
    func declareBudget(_ request: Request, customer: String, budget: String, removed: Bool, key: APIKeyRecord?) async throws -> Response {
        requests.increment()
        if let refusal = mayGrant(key, to: customer, what: "set budgets") { return refusal }
        guard let body = try await body(request, limit: 16 * 1024) else {
            return problem(.contentTooLarge, "request body too large", "a budget's body is at most 16 KiB")
        }
        let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
        switch BudgetRequest.event(customerID: customer, budget: budget, body: body, removed: removed, nowMicroseconds: now) {
        case .failure(let error):
            return fieldErrors("invalid budget", error.description, error.violations)
        case .success(let (event, bytes)):
            if let violation = parser.timeViolation(event.time, nowMicroseconds: now) {
                return fieldErrors("invalid budget", violation.description, [violation])
            }
            if let meters, case .meter(let meter)? = event.definition?.measure, let refusal = await meters.undeclared(meter) {
                return fieldErrors("invalid budget", refusal, [FieldViolation("meter", refusal)])
            }
            switch await publishOne(signedCredit(customer, bytes)) {
            case .success(let report):
                logger.info("budget \(budget) of \(customer) \(removed ? "removed" : "declared") (\(event.id))")
                return json(.accepted, .object([("id", .string(event.id)), ("budget", .string(budget)), ("status", .string(removed ? "removed" : "accepted")),
                                                 ("partition", .number(Int64(report.partition))), ("offset", .number(report.offset))]))
            case .failure(let error):
                var headers = HTTPFields()
                headers[.retryAfter] = "5"
                return problem(.serviceUnavailable, "broker unavailable",
                               "the budget was \(error.code == .deliveryUnknown ? "perhaps not" : "not") written (\(error)); resend it with an id to make that safe",
                               headers: headers)
            }
        }
    }

    /// A grant or void record signed with the credit keyring (`mayGrant` checked there is one).
    private func signedCredit(_ customer: String, _ bytes: [UInt8]) -> ProducerRecord {
        ProducerRecord.signedCredit(topic: topic, customerID: customer, value: bytes, keyring: creditKeyring!)!
    }

    /// Publishes one record; the result is the broker's acknowledgement or why there is none.
    func publishOne(_ record: ProducerRecord) async -> Result<DeliveryReport, KafkaError> {
        let usedProducer = producer
        let deliveries = await usedProducer.send([record])
        replaceIfBroken(usedProducer, after: deliveries)
        return deliveries[0]
    }

    /// A 400 for a body that is no valid request: malformed JSON (with its byte position) or field violations.
    func invalid(_ error: EventDecodingError, vendor: GatewayAPI.Vendor? = nil) -> Response {
        if case .malformedJSON(let syntax) = error {
            return problem(.badRequest, "malformed JSON", syntax.description, extra: [("position", .number(Int64(syntax.offset)))], vendor: vendor)
        }
        return fieldErrors("invalid request", error.description, error.violations, vendor: vendor)
    }

    /// A 400 whose `errors` name each field and why: `[{"field": …, "reason": …}]`.
    func fieldErrors(_ title: String, _ detail: String, _ violations: [FieldViolation], vendor: GatewayAPI.Vendor? = nil) -> Response {
        let errors = violations.map { JSONField.object([("field", .string($0.path)), ("reason", .string($0.reason))]) }
        return problem(.badRequest, title, detail, extra: [("errors", .array(errors))], vendor: vendor)
    }

    /// Meters a client names must be declared. Meters Tally's own provider mappers and gateway
    /// fill are not checked: the call they meter has happened, and the aggregator keeps readings
    /// of an undeclared meter until it is declared.
    private func refusingUndeclaredMeters(_ outcomes: [IngestOutcome]) async -> [IngestOutcome] {
        guard let meters else { return outcomes }
        return await meters.refusingUndeclared(outcomes)
    }

    /// A key limited to an environment may only send events of that environment; a customer's
    /// key only events of that customer.
    private func limited(_ outcomes: [IngestOutcome], to key: APIKeyRecord?) -> [IngestOutcome] {
        guard let key, key.environment != nil || key.customerID != nil else { return outcomes }
        return outcomes.map { outcome in
            guard case .valid(let event, _) = outcome else { return outcome }
            if let allowed = key.environment, event.environment != allowed {
                return .rejected([FieldViolation("data.environment", "this API key may only send events of environment \"\(allowed)\"")])
            }
            if let customer = key.customerID, event.subject != customer {
                return .rejected([FieldViolation("subject", "this API key may only send events of customer \"\(customer)\"")])
            }
            return outcome
        }
    }

    /// Publishes the valid events and answers per event, in request order.
    private func publish(_ outcomes: [IngestOutcome], single: Bool) async -> Response {
        var records: [ProducerRecord] = []
        var recordIndex: [Int] = []
        for (index, outcome) in outcomes.enumerated() {
            if case .valid(let event, let bytes) = outcome {
                records.append(ProducerRecord(topic: topic, key: Array(event.subject.utf8), value: bytes))
                recordIndex.append(index)
            }
        }
        let started = ContinuousClock.now
        let usedProducer = producer
        let deliveries = await usedProducer.send(records)
        replaceIfBroken(usedProducer, after: deliveries)
        let elapsed = ContinuousClock.now - started
        if !records.isEmpty {
            produceLatency.recordNanoseconds(elapsed.totalNanoseconds)
        }
        var delivery: [Int: Result<DeliveryReport, KafkaError>] = [:]
        for (position, index) in recordIndex.enumerated() { delivery[index] = deliveries[position] }
        // Events that settle a `/v1/check` hold: it now lasts until the rater has counted them.
        if let budgets, budgets.holdsEvents {
            for (index, result) in delivery {
                if case .valid(let event, _) = outcomes[index], case .success(let report) = result {
                    budgets.accepted(event, at: LogPosition(partition: report.partition, offset: report.offset))
                }
            }
        }

        // Results are written straight to JSON: a batch answers thousands of them.
        var results = JSONWriter(capacity: outcomes.count * 96)
        results.raw("[")
        var counts = (accepted: 0, rejected: 0, duplicate: 0, notWritten: 0, unknown: 0)
        var firstViolations: [FieldViolation] = []
        var notWrittenIDs: [String] = []
        for (index, outcome) in outcomes.enumerated() {
            results.raw(index == 0 ? "{" : ",{")
            results.key("index", first: true)
            results.integer(Int64(index))
            switch outcome {
            case .valid(let event, _):
                results.key("id")
                results.string(event.id)
                switch delivery[index]! {
                case .success(let report):
                    counts.accepted += 1
                    results.raw(#","status":"accepted","partition":"#)
                    results.integer(Int64(report.partition))
                    results.key("offset")
                    results.integer(report.offset)
                case .failure(let error):
                    // `unknown`: sent, not confirmed in time, perhaps written; `not_written`: not in the log.
                    // Either is safe to resend with the same id.
                    let unknown = error.code == .deliveryUnknown
                    if unknown { counts.unknown += 1 } else { counts.notWritten += 1 }
                    if notWrittenIDs.count < 20 { notWrittenIDs.append(event.id) }
                    results.raw(unknown ? #","status":"unknown","reason":"# : #","status":"not_written","reason":"#)
                    results.string(error.description)
                }
            case .rejected(let violations):
                counts.rejected += 1
                if firstViolations.isEmpty { firstViolations = violations }
                for violation in violations { rejectedCounter(violation.path == "" ? .malformed : violation.path == "time" ? .timeWindow : .invalid).increment() }
                results.raw(#","status":"rejected","errors":["#)
                for (number, violation) in violations.enumerated() {
                    results.raw(number == 0 ? "{" : ",{")
                    results.key("field", first: true)
                    results.string(violation.path)
                    results.key("reason")
                    results.string(violation.reason)
                    results.raw("}")
                }
                results.raw("]")
            case .duplicateInRequest(let first):
                counts.duplicate += 1
                results.raw(#","status":"duplicate_in_request","first_index":"#)
                results.integer(Int64(first))
            }
            results.raw("}")
        }
        results.raw("]")
        accepted.increment(by: counts.accepted)
        duplicates.increment(by: counts.duplicate)
        notWritten.increment(by: counts.notWritten)
        unconfirmed.increment(by: counts.unknown)
        let unanswered = counts.notWritten + counts.unknown
        if unanswered > 0 {
            logger.warning("broker did not acknowledge \(unanswered) events (\(counts.notWritten) not written, \(counts.unknown) unknown); the client was told to resend them",
                           metadata: ["event_ids": "\(notWrittenIDs.joined(separator: ","))\(unanswered > notWrittenIDs.count ? ",…" : "")"])
        }
        let summary: [(String, JSONField)] = [
            ("accepted", .number(Int64(counts.accepted))), ("rejected", .number(Int64(counts.rejected))),
            ("duplicates", .number(Int64(counts.duplicate))), ("not_written", .number(Int64(counts.notWritten))),
            ("unknown", .number(Int64(counts.unknown))),
            ("results", .raw(results.bytes)),
        ]
        if unanswered > 0 {
            var headers = HTTPFields()
            headers[.retryAfter] = "5"
            let detail = counts.unknown == 0
                ? "\(counts.notWritten) events were not written; resend them (ids are idempotency keys)"
                : "\(unanswered) events were not confirmed by the broker in time (\(counts.unknown) may have been written); resend them with the same ids: the consumers count each id once"
            return problem(.serviceUnavailable, "broker unavailable", detail,
                           extra: summary, headers: headers)
        }
        if counts.accepted == 0 && counts.duplicate == 0 {
            let detail = single ? firstViolations.map(\.description).joined(separator: "; ") : "no event in the request is valid"
            return problem(.badRequest, "invalid event", detail, extra: summary)
        }
        return json(.accepted, .object(summary))
    }

    /// An idempotent producer that timed out can come back fenced or fatally broken, failing
    /// every later send; librdkafka's answer is a new producer. The failed events were
    /// answered not written, and their ids make a resend safe.
    private func replaceIfBroken(_ used: KafkaProducer, after deliveries: [Result<DeliveryReport, KafkaError>]) {
        let broken = used.hasFatalError || deliveries.contains { result in
            if case .failure(let error) = result { return error.requiresNewClient } else { return false }
        }
        guard broken else { return }
        producerBox.lock.withLock {
            guard producerBox.producer === used else { return }
            do {
                producerBox.producer = try KafkaProducer(configuration: kafkaConfiguration, logger: logger)
                logger.warning("producer hit a fatal error; replaced it with a new one")
            } catch {
                logger.error("could not replace the broken producer: \(error)")
            }
        }
        Task { await used.close(flushTimeout: .seconds(5)) }
    }

    func json(_ status: HTTPResponse.Status, _ value: JSONField, contentType: String = "application/json", headers extra: HTTPFields = [:]) -> Response {
        var writer = JSONWriter()
        value.write(to: &writer)
        var headers = extra
        headers[.contentType] = contentType
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: writer.bytes)))
    }

    /// An `application/problem+json` answer (RFC 9457); on a gateway route (`vendor` set) the
    /// vendor's own error shape, with the problem details in its `problem` member.
    func problem(_ status: HTTPResponse.Status, _ title: String, _ detail: String,
                 extra: [(String, JSONField)] = [], headers: HTTPFields = [:], vendor: GatewayAPI.Vendor? = nil) -> Response {
        let problem = JSONField.object([("type", .string("about:blank")), ("title", .string(title)), ("status", .number(Int64(status.code))),
                                        ("detail", .string(detail))] + extra)
        guard let vendor else { return json(status, problem, contentType: "application/problem+json", headers: headers) }
        var rendered = JSONWriter()
        problem.write(to: &rendered)
        let code = String(title.map { $0.isLetter || $0.isNumber ? Character($0.lowercased()) : "_" })
        var fields = headers
        fields[.contentType] = "application/json"
        let body = GatewayErrorBody.render(vendor, status: status.code, message: detail, code: code, problem: rendered.bytes)
        return Response(status: status, headers: fields, body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }
}

/// A JSON value to write, with object members in the given order.
indirect enum JSONField: Sendable {
    case string(String)
    case number(Int64)
    case array([JSONField])
    case object([(String, JSONField)])
    /// Already-rendered JSON.
    case raw([UInt8])

    func write(to writer: inout JSONWriter) {
        switch self {
        case .raw(let bytes): writer.raw(bytes)
        case .string(let text): writer.string(text)
        case .number(let value): writer.integer(value)
        case .array(let elements):
            writer.raw("[")
            for (index, element) in elements.enumerated() {
                if index > 0 { writer.raw(",") }
                element.write(to: &writer)
            }
            writer.raw("]")
        case .object(let members):
            writer.raw("{")
            for (index, (key, value)) in members.enumerated() {
                writer.key(key, first: index == 0)
                value.write(to: &writer)
            }
            writer.raw("}")
        }
    }
}
