import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import HTTPTypes
import Hummingbird
import Logging
import Metrics
import NIOCore
import TallyCore
import TallyKafka
import TallyPostgres

/// Gateway mode: OpenAI- and Anthropic-compatible routes that check the customer's credit,
/// forward the call to the upstream with the upstream's own key, pass the response back as
/// it arrives, and publish exactly one usage event per call from the usage the upstream reported.
final class Gateway: Sendable {
    struct Upstream: Sendable {
        /// Scheme, host and port, e.g. https://api.openai.com; the API's path is appended.
        let baseURL: String
        let apiKey: String

        /// `baseURL` with any user and password in it replaced by `***`: for logs and answers.
        var displayURL: String { Self.redacted(baseURL) }

        static func redacted(_ url: String) -> String {
            guard var components = URLComponents(string: url), components.user != nil || components.password != nil else { return url }
            components.user = "***"
            components.password = nil
            return components.string ?? "(an upstream URL)"
        }
    }

    struct Settings: Sendable {
        var upstreams: [GatewayAPI.Vendor: Upstream]
        /// Honoured only for keys that name no customer: an application key trusted to say whom a call is for.
        var customerHeader: HTTPField.Name?
        /// Output tokens reserved for a call whose request sets no maximum.
        var defaultOutputTokens: Int64
        var maxBodyBytes: Int
    }

    let settings: Settings
    let service: IngestService
    let client: UpstreamClient
    let credit: CreditGuard
    let logger: Logger

    let upstreamLatency = Metrics.Timer(label: "tally_gateway_upstream_seconds")
    let overshootNanos = Counter(label: "tally_gateway_reservation_overshoot_nanos_total")
    let overshotCalls = Counter(label: "tally_gateway_overshot_calls_total")
    let eventsNotWritten = Counter(label: "tally_gateway_usage_events_not_written_total")
    /// Usage events on their way to the broker, so shutdown can wait for them.
    private let publishing = PublishCount()

    private final class PublishCount: @unchecked Sendable {
        private let lock = NSLock()
        private var count = 0
        func add(_ delta: Int) { lock.withLock { count += delta } }
        var value: Int { lock.withLock { count } }
    }
    private let counters: [GatewayAPI: (proxied: Counter, refused: Counter, unmetered: Counter, timeouts: Counter, unreachable: Counter)]

    init(settings: Settings, service: IngestService, client: UpstreamClient, credit: CreditGuard, logger: Logger) {
        self.settings = settings
        self.service = service
        self.client = client
        self.credit = credit
        self.logger = logger
        counters = Dictionary(uniqueKeysWithValues: GatewayAPI.allCases.map { api in
            let dimensions = [("api", api.rawValue)]
            return (api, (Counter(label: "tally_gateway_proxied_calls_total", dimensions: dimensions),
                          Counter(label: "tally_gateway_refused_calls_total", dimensions: dimensions),
                          Counter(label: "tally_gateway_unmetered_calls_total", dimensions: dimensions),
                          Counter(label: "tally_gateway_upstream_errors_total", dimensions: dimensions + [("kind", "timeout")]),
                          Counter(label: "tally_gateway_upstream_errors_total", dimensions: dimensions + [("kind", "unreachable")])))
        })
    }

    func register(on router: Router<BasicRequestContext>) {
        for api in GatewayAPI.allCases {
            router.post(RouterPath(stringLiteral: String(api.path.dropFirst()))) { request, _ in
                try await self.service.authenticated(request, scopes: [.ingest], vendor: api.vendor) { key in try await self.proxy(request, api: api, key: key) }
            }
        }
    }

    /// One proxied call. Everything before the upstream is called can refuse it; after that
    /// the response goes back as it came and the call is metered by what the upstream reported.
    func proxy(_ request: Request, api: GatewayAPI, key: APIKeyRecord?) async throws -> Response {
        let receivedAt = CreditGuard.nowMicroseconds()
        guard let upstream = settings.upstreams[api.vendor] else {
            return service.problem(.notFound, "no upstream", "this tally-ingest forwards no \(api.vendor.rawValue) calls: start it with --\(api.vendor.rawValue)-upstream URL", vendor: api.vendor)
        }
        let customerID: String
        if let owner = key?.customerID {
            customerID = owner
        } else if let header = settings.customerHeader, let named = request.headers[header], !named.isEmpty {
            // Naming who pays (and reading their credit in a 402) is a permission of its own.
            guard key?.mayNameCustomer ?? true else {
                return service.problem(.forbidden, "may not name a customer",
                                       "this API key may not name the customer in \(header.rawName); create one with: tally keys create --names-customers",
                                       vendor: api.vendor)
            }
            customerID = named
        } else {
            return service.problem(.forbidden, "no customer", "this API key names no customer: create one with tally keys create --customer C"
                                   + (settings.customerHeader.map { ", or name the customer in the \($0.rawName) header" } ?? ""), vendor: api.vendor)
        }
        guard let body = try await service.body(request, limit: settings.maxBodyBytes) else {
            return service.problem(.contentTooLarge, "request body too large", "the limit is \(settings.maxBodyBytes) bytes", vendor: api.vendor)
        }
        let call: GatewayRequest
        switch GatewayRequest.parse(api, body: body) {
        case .success(let parsed): call = parsed
        case .failure(let error): return service.invalid(error, vendor: api.vendor)
        }
        // The event is checked before the call (customer id, model, feature, environment), so a
        // call is never made that could not be metered.
        var event = UsageEvent(id: "gw_" + Self.randomHex(12), source: "tally://gateway/\(api.rawValue)", subject: customerID,
                               time: EventTime(microseconds: receivedAt), model: call.model, provider: api.usageProvider.providerLabel,
                               feature: request.headers[HTTPField.Name("x-tally-feature")!],
                               environment: key?.environment ?? request.headers[HTTPField.Name("x-tally-environment")!],
                               inputTokens: 0, outputTokens: 0)
        // OpenAI's and Anthropic's SDKs number their retries in x-stainless-retry-count (0 first).
        if let retries = request.headers[HTTPField.Name("x-stainless-retry-count")!].flatMap({ Int($0) }), (0..<1000).contains(retries) {
            event.properties[CallStatus.attemptProperty] = String(retries + 1)
        }
        // Dimensions budgets pick usage by: the calling key, and the caller's own properties.
        if let key { event.properties["api_key"] = key.keyID }
        for field in request.headers where field.name.canonicalName.hasPrefix(Self.propertyHeaderPrefix) {
            let name = String(field.name.canonicalName.dropFirst(Self.propertyHeaderPrefix.count))
            if !name.isEmpty && !Self.reservedProperties.contains(name) { event.properties[name] = field.value }
        }
        if case .rejected(let violations) = validate(event) {
            return service.problem(.badRequest, "call cannot be metered", violations.map(\.description).joined(separator: "; "), vendor: api.vendor)
        }
        let expected = TokenCounts(input: call.inputTokenEstimate, output: call.maxOutputTokens ?? settings.defaultOutputTokens)
        let hold: Int?
        let estimateNanos: Int64
        let profile: BillingProfile
        switch await credit.admit(customerID: customerID, model: call.model, expected: expected) {
        case .admitted(let id, let estimate, let admittedProfile):
            hold = id
            estimateNanos = estimate
            profile = admittedProfile
        case .refused(let available, let refusedProfile):
            counters[api]!.refused.increment()
            let currency = refusedProfile.currency
            // Said to the application's user, not to an operator: what is wrong and what helps.
            return service.problem(HTTPResponse.Status(code: 402), "insufficient credit",
                                   "not enough prepaid credit for this call: \(currency.format(available)) \(currency) is left, and the account may not "
                                   + "go below \(refusedProfile.overage == .stop ? "zero" : "its overage limit"); the call can be made once credit is added",
                                   extra: [("customer", .string(customerID)), ("available", .string(Money.format(nanos: available))),
                                           ("currency", .string(currency.code)),
                                           ("operator_hint", .string("grant credit with: tally grant --customer \(customerID) --amount A"))],
                                   vendor: api.vendor)
        case .unpricedRefused(let model):
            counters[api]!.refused.increment()
            return service.problem(HTTPResponse.Status(code: 402), "model not priced",
                                   "calls to \(model) cannot be billed yet (no price is set for it), so they are refused for this account",
                                   extra: [("customer", .string(customerID)), ("model", .string(model)),
                                           ("operator_hint", .string("price the model (tally pricing apply) or start tally-ingest with --unpriced-model-price"))],
                                   vendor: api.vendor)
        case .unavailable:
            var headers = HTTPFields()
            headers[.retryAfter] = "5"
            return service.problem(.serviceUnavailable, "credit check unavailable", "the wallet database does not answer; retry", headers: headers, vendor: api.vendor)
        }

        // Budgets after credit: a call either budget refuses holds nothing.
        let budgetHold: Int
        switch await service.budgets?.admit(event, route: .gateway, hold: true, estimate: { [expected] definition in
            Self.budgetAmount(definition, counts: expected, chargeNanos: estimateNanos, currency: profile.currency)
        }) ?? .unbudgeted {
        case .unbudgeted: budgetHold = 0
        case .admitted(let id, _): budgetHold = id
        case .refused(let budget, _):
            credit.release(hold)
            counters[api]!.refused.increment()
            return budgetRefusal(budget, customerID: customerID, vendor: api.vendor)
        case .unavailable:
            credit.release(hold)
            var headers = HTTPFields()
            headers[.retryAfter] = "5"
            return service.problem(.serviceUnavailable, "budget check unavailable", "the budget database does not answer; retry", headers: headers, vendor: api.vendor)
        }

        var upstreamRequest = URLRequest(url: URL(string: upstream.baseURL + api.path)!)
        upstreamRequest.httpMethod = "POST"
        for field in request.headers where forwardsRequestHeader(field.name.canonicalName) {
            upstreamRequest.addValue(field.value, forHTTPHeaderField: field.name.rawName)
        }
        switch api.vendor {
        case .openai: upstreamRequest.setValue("Bearer \(upstream.apiKey)", forHTTPHeaderField: "Authorization")
        case .anthropic:
            upstreamRequest.setValue(upstream.apiKey, forHTTPHeaderField: "x-api-key")
            if request.headers[HTTPField.Name("anthropic-version")!] == nil {
                upstreamRequest.setValue("2023-06-01", forHTTPHeaderField: "anthropic-version")
            }
        }
        upstreamRequest.setValue("application/json", forHTTPHeaderField: "Content-Type")
        // The usage is read from the bytes as they pass: they must arrive uncompressed.
        upstreamRequest.setValue("identity", forHTTPHeaderField: "Accept-Encoding")
        upstreamRequest.httpBody = Data(call.upstreamBody)

        counters[api]!.proxied.increment()
        let sent = ContinuousClock.now
        let head: UpstreamClient.Head
        let stream: AsyncThrowingStream<[UInt8], Error>
        do {
            (head, stream) = try await client.send(upstreamRequest)
        } catch {
            // No response: nothing was reported used, so nothing is metered.
            credit.release(hold)
            service.budgets?.release(budgetHold)
            if UpstreamClient.isTimeout(error) {
                counters[api]!.timeouts.increment()
                return service.problem(.gatewayTimeout, "upstream timed out", "\(upstream.displayURL) did not answer in time", vendor: api.vendor)
            }
            counters[api]!.unreachable.increment()
            return service.problem(.badGateway, "upstream unreachable",
                                   "\(upstream.displayURL): \(error.localizedDescription.replacingOccurrences(of: upstream.baseURL, with: upstream.displayURL))",
                                   vendor: api.vendor)
        }
        upstreamLatency.recordNanoseconds((ContinuousClock.now - sent).totalNanoseconds)

        var headers = HTTPFields()
        var isEventStream = false
        for (name, value) in head.headers where Self.forwardsResponseHeader(name.lowercased()) {
            guard let fieldName = HTTPField.Name(name) else { continue }
            headers.append(HTTPField(name: fieldName, value: value))
            if name.lowercased() == "content-type" && value.lowercased().hasPrefix("text/event-stream") { isEventStream = true }
        }
        headers[HTTPField.Name("x-tally-event-id")!] = event.id
        let meter = CallMeter(api: api, hold: hold, budgetHold: budgetHold, profile: profile, upstreamStatus: head.status)
        let removeUsageChunk = call.addedUsageChunk
        let streamed = isEventStream
        let callEvent = event
        // The upstream is read to its end by a task of its own, not by the caller's response: a
        // caller that leaves mid-stream does not stop the vendor generating (and billing) the
        // rest, so the call is metered from the usage the vendor reports at the end.
        let (toCaller, callerFeed) = AsyncThrowingStream<[UInt8], Error>.makeStream()
        Task { [self] in
            var event = callEvent
            var scanner = ResponseUsageScanner(api: api, isEventStream: streamed, removeUsageChunk: removeUsageChunk)
            var callerLeft = false
            func forward(_ bytes: [UInt8]) {
                guard !bytes.isEmpty, case .terminated = callerFeed.yield(bytes) else { return }
                callerLeft = true
            }
            do {
                for try await chunk in stream { forward(scanner.feed(chunk)) }
                forward(scanner.finish())
            } catch {
                // The upstream broke off: meter what was reported, and end the caller's response
                // abnormally so a cut stream never looks complete.
                meter.finish(&event, scanner: scanner, complete: false, gateway: self)
                callerFeed.finish(throwing: error)
                return
            }
            if callerLeft { event.properties["caller_left"] = "true" }
            meter.finish(&event, scanner: scanner, complete: true, gateway: self)
            callerFeed.finish()
        }
        return Response(status: HTTPResponse.Status(code: head.status), headers: headers, body: ResponseBody { writer in
            for try await bytes in toCaller { try await writer.write(ByteBuffer(bytes: bytes)) }
            try await writer.finish(nil)
        })
    }

    /// `x-tally-property-team: search` sets the call's property `team` (names are lower-case:
    /// HTTP header names are case-insensitive). Properties the gateway sets itself stay its own.
    static let propertyHeaderPrefix = "x-tally-property-"
    /// (`batch` and `service_tier` are facts the vendor reports: they pick discounted prices.)
    static let reservedProperties: Set<String> = [CallStatus.property, CallStatus.attemptProperty, "api_key", "gateway_api", "upstream_status",
                                                  "response_id", "stream", "incomplete", "caller_left", StandardProperty.serviceTier,
                                                  StandardProperty.batch, BudgetDefinition.requestedModelProperty]

    /// What a call of `counts` adds to a budget: its tokens, its charge (in the customer's
    /// currency; a money budget in another currency holds nothing), or its meter's quantity.
    static func budgetAmount(_ definition: BudgetDefinition, counts: TokenCounts, chargeNanos: Int64?, currency: Currency) -> Int64 {
        switch definition.measure {
        case .tokens: return Money.saturatingAdd(counts.input, counts.output)
        case .money(let budgetCurrency): return budgetCurrency == currency ? chargeNanos ?? 0 : 0
        case .meter(let name): return counts.meters[name] ?? 0
        case .calls: return 1
        }
    }

    /// 429 in the API's own error shape: which budget, its period and when it resets.
    func budgetRefusal(_ budget: BudgetAvailability, customerID: String, vendor: GatewayAPI.Vendor) -> Response {
        let definition = budget.definition, measure = definition.measure
        let resets = EventTime.format(microseconds: budget.period.end)
        var headers = HTTPFields()
        if definition.period != .total { headers[.retryAfter] = String(max(1, (budget.period.end - CreditGuard.nowMicroseconds() + 999_999) / 1_000_000)) }
        var scopes = definition.dimensions.isEmpty ? [] : [definition.dimensionsText]
        if let per = definition.per { scopes.append("\(per)=\(budget.value)") }
        let scope = scopes.isEmpty ? "" : " for " + scopes.joined(separator: ", ")
        let period = switch definition.period {
        case .billingPeriod: " a billing period"
        case .total: " in all"
        default: " a " + definition.period.rawValue
        }
        return service.problem(.tooManyRequests, "budget exhausted",
                               "the budget \(definition.name) (\(measure.format(definition.limit)) \(measure.unit)\(period)\(scope)) "
                               + (definition.period == .total ? "is used up; calls can be made again once the budget is raised"
                                  : "is used up until \(resets); calls can be made again then, or once the budget is raised"),
                               extra: [("customer", .string(customerID)), ("budget", .string(definition.name)), ("period", .string(definition.period.rawValue)),
                                       ("limit", .string(measure.format(definition.limit))), ("used", .string(measure.format(budget.used))),
                                       ("held", .string(measure.format(budget.held))), ("unit", .string(measure.unit)), ("resets_at", IngestService.resetsAt(budget))]
                                       + (definition.per.map { [("per", .string($0)), ("value", .string(budget.value))] } ?? []),
                               headers: headers, vendor: vendor)
    }

    /// The event as ingest validates any event (lengths, ids, time window).
    func validate(_ event: UsageEvent) -> IngestOutcome {
        switch service.parser.parse(EventEncoder.encode(event), format: .json, nowMicroseconds: CreditGuard.nowMicroseconds()) {
        case .success(let outcomes): return outcomes.first ?? .rejected([FieldViolation("", "no event")])
        case .failure(let error): return .rejected([FieldViolation("", "\(error)")])
        }
    }

    /// Turns what a call reported into its one usage event and publishes it; the hold on the
    /// customer's credit becomes the actual charge until the rater has debited it.
    struct CallMeter: Sendable {
        let api: GatewayAPI
        let hold: Int?
        let budgetHold: Int
        let profile: BillingProfile
        let upstreamStatus: Int

        func finish(_ event: inout UsageEvent, scanner: ResponseUsageScanner, complete: Bool, gateway: Gateway) {
            var scanner = scanner
            if !complete { _ = scanner.finish() }
            let metadata: Logger.Metadata = ["event_id": "\(event.id)", "customer_id": "\(event.subject)", "upstream_status": "\(upstreamStatus)"]
            guard let reported = scanner.counts() else {
                gateway.credit.release(hold)
                gateway.service.budgets?.release(budgetHold)
                gateway.counters[api]!.unmetered.increment()
                if (200..<300).contains(upstreamStatus) {
                    gateway.logger.warning("the upstream reported no usage for a call\(complete ? "" : " that broke off"); it is not metered", metadata: metadata)
                }
                return
            }
            let counts: TokenCounts
            switch reported {
            case .success(let value): counts = value
            case .failure(let error):
                gateway.credit.release(hold)
                gateway.service.budgets?.release(budgetHold)
                gateway.counters[api]!.unmetered.increment()
                gateway.logger.error("the upstream's usage could not be read (\(error)); the call is not metered", metadata: metadata)
                return
            }
            if let model = scanner.model, model != event.model {
                // Budgets on `model` were checked against the model asked for; they match it still.
                event.properties[BudgetDefinition.requestedModelProperty] = event.model
                event.model = model
            }
            event.inputTokens = counts.input
            event.outputTokens = counts.output
            event.cacheReadInputTokens = counts.cacheRead
            event.cacheWriteInputTokens = counts.cacheWrite
            event.cacheWrite1hInputTokens = counts.cacheWrite1h
            event.reasoningOutputTokens = counts.reasoning
            event.meters = counts.meters
            event.properties[CallStatus.property] = CallStatus(upstreamStatus: upstreamStatus, errorReported: scanner.sawErrorEvent, brokeOff: !complete,
                                                               callerLeft: event.properties["caller_left"] == "true",
                                                               attempt: event.properties[CallStatus.attemptProperty].flatMap { Int($0) }).rawValue
            StandardProperty.apply(serviceTier: counts.serviceTier, to: &event.properties)
            event.properties["gateway_api"] = api.rawValue
            event.properties["upstream_status"] = String(upstreamStatus)
            if let id = scanner.responseID { event.properties["response_id"] = id }
            if scanner.isEventStream { event.properties["stream"] = "true" }
            if !complete || scanner.sawErrorEvent { event.properties["incomplete"] = "true" }
            let overshoot = gateway.credit.settle(hold, counts: counts, call: event, profile: profile)
            if budgetHold != 0 {
                let charge = gateway.credit.charge(counts, call: event, profile: profile)
                gateway.service.budgets?.settle(budgetHold) { Gateway.budgetAmount($0, counts: counts, chargeNanos: charge, currency: profile.currency) }
            }
            if overshoot > 0 {
                gateway.overshootNanos.increment(by: overshoot)
                gateway.overshotCalls.increment()
            }
            guard case .valid(let valid, let bytes) = gateway.validate(event) else {
                gateway.credit.release(hold)
                gateway.service.budgets?.release(budgetHold)
                gateway.counters[api]!.unmetered.increment()
                gateway.logger.error("the call's usage event is invalid; not metered: \(String(decoding: EventEncoder.encode(event), as: UTF8.self))", metadata: metadata)
                return
            }
            let hold = hold, budgetHold = budgetHold
            gateway.publishing.add(1)
            Task {
                await gateway.publish(valid, bytes: bytes, hold: hold, budgetHold: budgetHold)
                gateway.publishing.add(-1)
            }
        }
    }

    /// Publishes a call's event, retrying for about two minutes; an event that still cannot
    /// be written is logged whole, so it can be re-sent (its id keeps that safe).
    func publish(_ event: UsageEvent, bytes: [UInt8], hold: Int?, budgetHold: Int) async {
        var delay = Duration.seconds(1)
        for attempt in 1...7 {
            switch await service.publishOne(ProducerRecord(topic: service.topic, key: Array(event.subject.utf8), value: bytes)) {
            case .success(let report):
                credit.published(hold, at: LogPosition(partition: report.partition, offset: report.offset))
                service.budgets?.published(budgetHold, at: LogPosition(partition: report.partition, offset: report.offset))
                return
            case .failure(let error):
                logger.warning("usage event not written (attempt \(attempt)): \(error)", metadata: ["event_id": "\(event.id)"])
                try? await Task.sleep(for: delay)
                delay *= 2
            }
        }
        credit.release(hold)
        service.budgets?.release(budgetHold)
        eventsNotWritten.increment()
        logger.error("usage event could not be written; re-send it to POST /v1/events", metadata: [
            "event_id": "\(event.id)", "event": "\(String(decoding: bytes, as: UTF8.self))",
        ])
    }

    /// Waits (up to `timeout`) for the usage events of answered calls to reach the broker.
    func drain(timeout: Duration) async {
        let deadline = ContinuousClock.now + timeout
        while publishing.value > 0 && ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(50)) }
        if publishing.value > 0 { logger.error("\(publishing.value) usage events still unwritten at shutdown") }
    }

    /// Hop-by-hop and credential headers stay here; Tally's own headers are for Tally.
    /// Hop-by-hop headers (RFC 9110 §7.6.1), credentials, cookies and Tally's own headers stay
    /// here; `customerHeader` (whom the call is for) is Tally's business, not the vendor's.
    func forwardsRequestHeader(_ name: String) -> Bool {
        let name = name.lowercased()
        return !["host", "authorization", "x-api-key", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                 "trailer", "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding", "content-type", "expect",
                 "cookie"].contains(name)
            && !name.hasPrefix("x-tally-") && name != settings.customerHeader?.canonicalName
    }

    /// Hop-by-hop headers and cookies the vendor sets for the gateway never reach the caller.
    static func forwardsResponseHeader(_ name: String) -> Bool {
        !["connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date", "te", "trailer",
          "upgrade", "proxy-authenticate", "proxy-connection", "set-cookie", "set-cookie2", "alt-svc"].contains(name)
    }

    static func randomHex(_ bytes: Int) -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
    }
}
