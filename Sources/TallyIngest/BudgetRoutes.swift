import Foundation
import HTTPTypes
import Hummingbird
import TallyCore
import TallyPipeline
import TallyPostgres

/// `POST /v1/check` and `GET /v1/customers/{customer}/budgets`: budgets for applications that
/// do not call models through the gateway (docs/budgets.md#enforcement).
extension IngestService {
    func registerBudgetRoutes(on router: Router<BasicRequestContext>) {
        router.post("v1/check") { request, _ in
            try await self.authenticated(request, scopes: [.ingest]) { key in try await self.check(request, key: key) }
        }
        router.get("v1/customers/:customer/budgets") { request, context in
            try await self.authenticated(request, scopes: [.ingest, .read]) { key in
                guard let customer = Self.pathSegment(context.parameters.get("customer")) else { return self.badPath() }
                if let owner = key?.customerID, owner != customer {
                    return self.problem(.forbidden, "forbidden", "this API key may only read the budgets of customer \"\(owner)\"")
                }
                return await self.listBudgets(customer)
            }
        }
    }

    /// What `/v1/check` was asked.
    struct CheckRequest {
        var customer = ""
        var dimensions: [String: String] = [:]
        var tokens: Int64 = 0
        var amount: (nanos: Int64, currency: Currency?)?
        var meters: [String: Int64] = [:]
        var hold = false
        var eventID: String?
        var holdSeconds: Int64 = 600

        static let fields = ["customer", "dimensions", "tokens", "amount", "currency", "meters", "hold", "event_id", "hold_seconds"]

        /// The body read, or every field at fault with why.
        static func parse(_ body: [UInt8]) -> Result<CheckRequest, EventDecodingError> {
            guard case .success(.object(let fields)) = JSONValue.parse(body) else {
                return .failure(.invalid([FieldViolation("", "the body must be a JSON object")]))
            }
            var request = CheckRequest()
            var violations: [FieldViolation] = []
            func fail(_ field: String, _ reason: String) { violations.append(FieldViolation(field, reason)) }
            for name in fields.keys.sorted() where !Self.fields.contains(name) { fail(name, "is not a field of a check: \(Self.fields.joined(separator: ", ")) are") }
            if let customer = fields["customer"]?.string, EventLimits.isLabel(customer, length: EventLimits.subjectLength) {
                request.customer = customer
            } else {
                fail("customer", "is required: the customer id (1 to 256 characters, no control characters)")
            }
            if let value = fields["dimensions"] {
                if case .object(let members) = value, members.count <= EventLimits.maxProperties {
                    for (name, member) in members.sorted(by: { $0.key < $1.key }) {
                        guard EventLimits.isLabel(name, length: EventLimits.propertyKeyLength) else {
                            fail("dimensions", "names are 1 to \(EventLimits.propertyKeyLength.upperBound) characters without control characters")
                            continue
                        }
                        if let text = member.string, EventLimits.isLabel(text, length: 1...EventLimits.maxPropertyValueLength) {
                            request.dimensions[name] = text
                        } else {
                            fail("dimensions.\(name)", "must be a non-empty string of at most \(EventLimits.maxPropertyValueLength) characters without control characters")
                        }
                    }
                } else {
                    fail("dimensions", "must be an object of dimension values, e.g. {\"team\": \"search\", \"model\": \"gpt-4o\"}")
                }
            }
            func quantity(_ value: JSONValue, _ field: String) -> Int64? {
                guard case .integer(.value(let number)) = value, (0...EventLimits.maxTokens).contains(number) else {
                    fail(field, "must be a whole number from 0 to \(EventLimits.maxTokens)")
                    return nil
                }
                return number
            }
            if let value = fields["tokens"] { request.tokens = quantity(value, "tokens") ?? 0 }
            var currency: Currency?
            if let value = fields["currency"] {
                if let code = value.string, let parsed = Currency(code) { currency = parsed } else { fail("currency", "must be an ISO 4217 code such as USD") }
            }
            if let value = fields["amount"] {
                if let text = value.string, GrantEvent.isPlainDecimal(text), let nanos = Money.nanos(text) {
                    request.amount = (nanos, currency)
                } else {
                    fail("amount", "must be a decimal string such as \"0.50\" (at most 9 decimals)")
                }
            }
            if let value = fields["meters"] {
                if case .object(let members) = value, members.count <= EventLimits.maxMeters {
                    for (name, member) in members { request.meters[name] = quantity(member, "meters.\(name)") }
                } else {
                    fail("meters", "must be an object of meter quantities, e.g. {\"web_search_requests\": 2}")
                }
            }
            if let value = fields["hold"] {
                if case .bool(let flag) = value { request.hold = flag } else { fail("hold", "must be true or false") }
            }
            if let value = fields["event_id"] {
                if let id = value.string, EventLimits.isLabel(id, length: EventLimits.idLength) { request.eventID = id } else { fail("event_id", "must be an event id (1 to 128 characters)") }
            }
            if let value = fields["hold_seconds"] {
                if case .integer(.value(let seconds)) = value, (1...3600).contains(seconds) { request.holdSeconds = seconds } else {
                    fail("hold_seconds", "must be a whole number of seconds from 1 to 3600")
                }
            }
            if request.hold && request.eventID == nil && fields["event_id"] == nil {
                fail("event_id", "is required with hold: the id of the usage event that will settle the hold")
            }
            return violations.isEmpty ? .success(request) : .failure(.invalid(violations))
        }

        /// The usage as a budget sees it: the dimensions as labels and properties.
        var call: UsageEvent {
            var properties = dimensions
            let labels = ["model", "feature", "environment", "provider"].map { properties.removeValue(forKey: $0) }
            return UsageEvent(id: eventID ?? "check", source: "check", subject: customer, time: EventTime(microseconds: CreditGuard.nowMicroseconds()),
                              model: labels[0] ?? "", provider: labels[3], feature: labels[1], environment: labels[2],
                              inputTokens: 0, outputTokens: 0, properties: properties)
        }

        /// The estimate on a budget, in its measure.
        func estimate(_ definition: BudgetDefinition) -> Int64 {
            switch definition.measure {
            case .tokens: return tokens
            case .calls: return 1  // a check stands for one call
            case .money(let budgetCurrency): return amount.flatMap { ($0.currency ?? budgetCurrency) == budgetCurrency ? $0.nanos : nil } ?? 0
            case .meter(let name): return meters[name] ?? 0
            }
        }
    }

    /// Answers whether the usage described may go ahead under the customer's budgets, with where
    /// each stands; with `hold`, reserves the estimate until the usage event with `event_id` is
    /// counted by the rater (or `hold_seconds` pass without it).
    func check(_ request: Request, key: APIKeyRecord?) async throws -> Response {
        requests.increment()
        guard let budgets else {
            return problem(.serviceUnavailable, "budgets unavailable", "this tally-ingest reads no database (--allow-anonymous), so it knows no budgets")
        }
        guard let body = try await body(request, limit: 16 * 1024) else {
            return problem(.contentTooLarge, "request body too large", "a check's body is at most 16 KiB")
        }
        let checked: CheckRequest
        switch CheckRequest.parse(body) {
        case .failure(let error): return fieldErrors("invalid check", error.description, error.violations)
        case .success(let parsed): checked = parsed
        }
        if let owner = key?.customerID, owner != checked.customer {
            return problem(.forbidden, "forbidden", "this API key may only check the budgets of customer \"\(owner)\"")
        }
        let expiresAt = CreditGuard.nowMicroseconds() + checked.holdSeconds * 1_000_000
        let decision = await budgets.admit(checked.call, route: .check, hold: checked.hold, includeSoft: true, eventID: checked.hold ? checked.eventID : nil,
                                           expiresAt: expiresAt, estimate: { [checked] in checked.estimate($0) })
        var fields: [(String, JSONField)]
        switch decision {
        case .unavailable:
            var headers = HTTPFields()
            headers[.retryAfter] = "5"
            return problem(.serviceUnavailable, "budget check unavailable", "the budget database does not answer; retry", headers: headers)
        case .unbudgeted:
            fields = [("allowed", .raw(Array("true".utf8))), ("customer", .string(checked.customer)), ("budgets", .array([]))]
        case .admitted(let hold, let standing):
            fields = [("allowed", .raw(Array("true".utf8))), ("customer", .string(checked.customer)), ("budgets", .array(standing.map(Self.budgetJSON)))]
            if hold != 0, let eventID = checked.eventID {
                fields.append(("hold", .object([("event_id", .string(eventID)), ("expires_at", .string(EventTime.format(microseconds: expiresAt)))])))
            }
        case .refused(let budget, let standing):
            fields = [("allowed", .raw(Array("false".utf8))), ("customer", .string(checked.customer)), ("refused_by", .string(budget.definition.name)),
                      ("resets_at", Self.resetsAt(budget)), ("budgets", .array(standing.map(Self.budgetJSON)))]
        }
        return json(.ok, .object(fields))
    }

    /// The customer's budgets with what each counted this period, what this instance holds and what is left.
    func listBudgets(_ customer: String) async -> Response {
        guard let budgets else {
            return problem(.serviceUnavailable, "budgets unavailable", "this tally-ingest reads no database (--allow-anonymous), so it knows no budgets")
        }
        let call = UsageEvent(id: "list", source: "list", subject: customer, time: EventTime(microseconds: CreditGuard.nowMicroseconds()), model: "",
                              inputTokens: 0, outputTokens: 0)
        switch await budgets.standing(of: call) {
        case .failure:
            var headers = HTTPFields()
            headers[.retryAfter] = "5"
            return problem(.serviceUnavailable, "budgets unavailable", "the budget database does not answer; retry", headers: headers)
        case .success(let standing):
            return json(.ok, .object([("customer", .string(customer)), ("budgets", .array(standing.map(Self.budgetJSON)))]))
        }
    }

    /// When the budget's period ends (RFC 3339); null for a `total` budget, which never resets.
    static func resetsAt(_ budget: BudgetAvailability) -> JSONField {
        budget.definition.period == .total ? .raw(Array("null".utf8)) : .string(EventTime.format(microseconds: budget.period.end))
    }

    /// One budget as the API shows it: amounts as strings in the budget's units.
    static func budgetJSON(_ budget: BudgetAvailability) -> JSONField {
        let definition = budget.definition, measure = definition.measure
        return .object([
            ("budget", .string(definition.name)), ("period", .string(definition.period.rawValue)), ("measure", .string(measure.kind)),
            ("unit", .string(measure.unit)), ("limit", .string(measure.format(definition.limit))), ("used", .string(measure.format(budget.used))),
            ("held", .string(measure.format(budget.held))), ("remaining", .string(measure.format(budget.remaining))),
            ("period_start", .string(EventTime.format(microseconds: budget.period.start))),
            ("resets_at", Self.resetsAt(budget)),
            ("enforced", .raw(Array((definition.enforced ? "true" : "false").utf8))),
            ("dimensions", .object(definition.dimensions.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) })),
        ] + (definition.per.map { [("per", .string($0)), ("value", .string(budget.value))] } ?? []))
    }
}
