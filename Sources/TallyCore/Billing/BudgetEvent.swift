/// The calendar period a budget counts over, in UTC.
public enum BudgetPeriod: String, Sendable, CaseIterable {
    case hour, day, week, month
    /// The customer's billing period (`BillingProfile.anchorDay`).
    case billingPeriod = "billing_period"
    /// One period for all time: the budget never resets (suits a budget per run or workflow).
    case total

    /// Where `total` ends: 10000-01-01T00:00:00Z, after any event time Tally accepts.
    static let endOfTime: Int64 = 253_402_300_800_000_000

    /// The period `[start, end)` (microseconds since the epoch) holding `microseconds`.
    /// Weeks start on Monday (ISO 8601); months on the 1st.
    public func containing(_ microseconds: Int64, profile: BillingProfile) -> BillingPeriod {
        let day = BillingPeriod.microsecondsPerDay
        let days = microseconds >= 0 ? microseconds / day : (microseconds - day + 1) / day
        switch self {
        case .hour:
            let hour: Int64 = 3_600_000_000
            let hours = microseconds >= 0 ? microseconds / hour : (microseconds - hour + 1) / hour
            return BillingPeriod(start: hours * hour, end: (hours + 1) * hour)
        case .day: return BillingPeriod(start: days * day, end: (days + 1) * day)
        case .week:
            // 1970-01-01 was a Thursday: Monday-based weekday is (days + 3) mod 7.
            let monday = days - ((days + 3) % 7 + 7) % 7
            return BillingPeriod(start: monday * day, end: (monday + 7) * day)
        case .month: return BillingPeriod.containing(microseconds, anchorDay: 1)
        case .billingPeriod: return profile.period(containing: microseconds)
        case .total: return BillingPeriod(start: 0, end: Self.endOfTime)
        }
    }
}

/// What a budget counts.
public enum BudgetMeasure: Hashable, Sendable {
    /// Input plus output tokens of model calls (input includes cache reads and writes, output
    /// includes reasoning: the OpenTelemetry GenAI convention the events follow).
    case tokens
    /// What the rater charged for the usage, in one currency (usage priced in another is not counted).
    case money(Currency)
    /// The quantity of one meter (`UsageEvent.meters`).
    case meter(String)
    /// Model calls (events with a model), one each.
    case calls

    /// "tokens", "USD", "meter web_search_requests": how amounts of it are labelled.
    public var unit: String {
        switch self {
        case .tokens: "tokens"
        case .money(let currency): currency.code
        case .meter(let name): name
        case .calls: "calls"
        }
    }

    /// The measure stored as its `kind` and `unit` (as the budget tables keep it); nil for neither.
    public init?(kind: String, unit: String) {
        switch kind {
        case "tokens": self = .tokens
        case "calls": self = .calls
        case "money":
            guard let currency = Currency(unit) else { return nil }
            self = .money(currency)
        case "meter": self = .meter(unit)
        default: return nil
        }
    }

    public var kind: String {
        switch self {
        case .tokens: "tokens"
        case .money: "money"
        case .meter: "meter"
        case .calls: "calls"
        }
    }

    /// An amount of it as people read it: money as a decimal, quantities as integers.
    public func format(_ amount: Int64) -> String {
        if case .money = self { return Money.format(nanos: amount) }
        return String(amount)
    }
}

/// How an anomaly watch compares an hour with the hours before it.
public struct AnomalyRule: Hashable, Sendable {
    /// An hour is anomalous once its usage reaches `factorPercent` / 100 times the mean of the
    /// `baselineHours` hours before it (hours without usage count as 0), and the watch's floor.
    public var factorPercent: Int
    public var baselineHours: Int

    public init(factorPercent: Int, baselineHours: Int) {
        self.factorPercent = factorPercent
        self.baselineHours = baselineHours
    }

    public static let factorRange = 101...100_000
    public static let baselineRange = 1...168

    /// "2.5" for 250.
    public var factorText: String {
        factorPercent % 100 == 0 ? String(factorPercent / 100) : Money.format(Int128(factorPercent), scale: 2, minimumFractionDigits: 0)
    }

    /// Whether `used` in an hour is anomalous against `baselineSum`, the usage of the `baselineHours` before it.
    public func isAnomalous(_ used: Int64, baselineSum: Int64, floor: Int64) -> Bool {
        used >= floor && Int128(used) * Int128(baselineHours) * 100 >= Int128(factorPercent) * Int128(baselineSum)
    }
}

/// A budget: a limit on what a customer (or part of its usage, picked by dimension values) may
/// use in each calendar period, with soft alerts at percentages of it. With `anomaly`, an
/// anomaly watch instead: hourly usage compared with the hours before it.
public struct BudgetDefinition: Hashable, Sendable {
    public var name: String
    public var period: BudgetPeriod
    public var measure: BudgetMeasure
    /// In nano-units of the currency for money, in tokens or meter units otherwise; above 0.
    public var limit: Int64
    /// Percentages of the limit at which an alert is raised once per period (100 always is).
    public var alertAt: [Int]
    /// A hard limit: the gateway and `POST /v1/check` refuse what would pass it. Soft budgets only alert.
    public var enforced: Bool
    /// Dimension → value the usage must have: `model`, `feature`, `environment`, `provider`, or a property name.
    public var dimensions: [String: String]
    /// A dimension whose every value has a budget of its own (`run_id`: each run may use the
    /// limit); usage without the dimension is not under the budget. Nil: one budget for all.
    public var per: String?
    /// An anomaly watch (period `hour`, never enforced): `limit` is the least usage an hour
    /// needs to count as anomalous.
    public var anomaly: AnomalyRule?

    public init(name: String, period: BudgetPeriod, measure: BudgetMeasure, limit: Int64, alertAt: [Int] = [], enforced: Bool = true,
                dimensions: [String: String] = [:], per: String? = nil, anomaly: AnomalyRule? = nil) {
        self.name = name
        self.period = period
        self.measure = measure
        self.limit = limit
        self.alertAt = alertAt
        self.enforced = enforced
        self.dimensions = dimensions
        self.per = per
        self.anomaly = anomaly
    }

    public static let maxDimensions = 8
    public static let maxAlerts = 10
    /// Alert percentages: 1 to 1000 (an alert past the limit suits a soft budget).
    public static let alertRange = 1...1000

    /// Lower-case letters, digits, `_` and `-`, starting with a letter, at most 64.
    public static func isValidName(_ name: String) -> Bool {
        guard let first = name.utf8.first, (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(first), name.utf8.count <= 64 else { return false }
        return name.utf8.allSatisfy {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "_")
                || $0 == UInt8(ascii: "-")
        }
    }

    /// The value of dimension `name` in `event` (nil when it has none).
    public static func value(of name: String, in event: UsageEvent) -> String? {
        switch name {
        case "model": event.model.isEmpty ? nil : event.model
        case "feature": event.feature
        case "environment": event.environment
        case "provider": event.provider
        default: event.properties[name]
        }
    }

    /// The property the gateway keeps the requested model in when the vendor reports another
    /// (`gpt-4o` answered as `gpt-4o-2024-08-06`): a budget on `model` matches either.
    public static let requestedModelProperty = "requested_model"

    /// Whether `event` has every dimension value the budget names.
    public func matches(_ event: UsageEvent) -> Bool {
        dimensions.allSatisfy { name, value in
            Self.value(of: name, in: event) == value || (name == "model" && event.properties[Self.requestedModelProperty] == value)
        }
    }

    /// Which of the budget's counters `event` falls under: `""` for a budget of all its usage,
    /// the value of `per` for a budget per value; nil when it is not under the budget.
    public func counter(of event: UsageEvent) -> String? {
        guard matches(event) else { return nil }
        guard let per else { return "" }
        // An empty value names no run: such usage is not under a budget per run.
        guard let value = Self.value(of: per, in: event), !value.isEmpty else { return nil }
        return value
    }

    /// What `event` adds to the budget; `charge` is what the rater charged it in that currency.
    public func amount(of event: UsageEvent, charge: (currency: Currency, nanos: Int64)?) -> Int64 {
        switch measure {
        case .tokens: return Money.saturatingAdd(event.inputTokens, event.outputTokens)
        case .money(let currency): return charge.flatMap { $0.currency == currency ? $0.nanos : nil } ?? 0
        case .meter(let name): return event.meters[name] ?? 0
        case .calls: return event.isModelCall ? 1 : 0
        }
    }

    /// The same usage is counted (period, measure, dimensions and `per` unchanged): usage so far carries over.
    public func countsLike(_ other: BudgetDefinition) -> Bool {
        period == other.period && measure == other.measure && dimensions == other.dimensions && per == other.per && (anomaly == nil) == (other.anomaly == nil)
    }

    /// `"team=search, end_user=u1"`, sorted; empty for a whole-customer budget.
    public var dimensionsText: String { dimensions.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ", ") }
}

/// Declares, changes or removes a customer's budget: type `tally.budget`, schema
/// `schemas/budget.v1.json`, keyed by the customer in the usage topic like grants, so the rater
/// meets budgets and usage in one order and a replay counts exactly what the live run counted.
/// A budget counts the usage after its declaration in the log.
public struct BudgetEvent: Hashable, Sendable {
    public var id: String
    public var source: String
    public var subject: String
    public var time: EventTime
    public var name: String
    /// Nil: the budget named is removed.
    public var definition: BudgetDefinition?
    public var extensions: [String: String]

    public init(id: String, source: String, subject: String, time: EventTime, name: String, definition: BudgetDefinition?,
                extensions: [String: String] = [:]) {
        self.id = id
        self.source = source
        self.subject = subject
        self.time = time
        self.name = name
        self.definition = definition
        self.extensions = extensions
    }

    public var customerID: String { subject }

    static let fields: Set<String> = ["budget", "period", "measure", "meter", "currency", "limit", "alert_at", "enforce", "dimensions", "per", "anomaly", "removed"]

    /// Reads `data` (already parsed); violations name `prefix` + the field.
    static func decodeData(_ value: JSONValue, prefix: String, violations: inout [FieldViolation]) -> (name: String, definition: BudgetDefinition?)? {
        guard case .object(let data) = value else {
            violations.append(FieldViolation(prefix.isEmpty ? "" : String(prefix.dropLast()), "must be an object"))
            return nil
        }
        let before = violations.count
        func fail(_ field: String, _ reason: String) { violations.append(FieldViolation(prefix + field, reason)) }
        for name in data.keys.sorted() where !fields.contains(name) {
            fail(name, "is not a field of a budget: \(fields.sorted().joined(separator: ", ")) are")
        }
        func text(_ field: String) -> String? {
            guard let value = data[field] else { return nil }
            guard let string = value.string, EventLimits.isLabel(string, length: 1...EventLimits.maxPropertyValueLength) else {
                fail(field, "must be a non-empty string of at most \(EventLimits.maxPropertyValueLength) characters without control characters")
                return nil
            }
            return string
        }
        let name = text("budget")
        if data["budget"] == nil { fail("budget", "is required: the budget's name") }
        if let name, !BudgetDefinition.isValidName(name) {
            fail("budget", "\"\(name)\" is not a budget name: lower-case letters, digits, _ and -, starting with a letter, at most 64")
        }
        if let removed = data["removed"] {
            guard removed == .bool(true) else {
                fail("removed", "must be true (to remove the budget); leave it out to declare one")
                return nil
            }
            for field in data.keys.sorted() where field != "budget" && field != "removed" && fields.contains(field) {
                fail(field, "is not allowed with removed: a removal names only the budget")
            }
            guard violations.count == before, let name else { return nil }
            return (name, nil)
        }
        var period: BudgetPeriod?
        if let raw = text("period") {
            period = BudgetPeriod(rawValue: raw)
            if period == nil { fail("period", "must be one of \(BudgetPeriod.allCases.map(\.rawValue).joined(separator: ", "))") }
        } else if data["period"] == nil {
            fail("period", "is required: \(BudgetPeriod.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        var measure: BudgetMeasure?
        switch text("measure") {
        case "tokens":
            measure = .tokens
        case "calls":
            measure = .calls
        case "money":
            if let code = text("currency") {
                if let currency = Currency(code) { measure = .money(currency) } else { fail("currency", "must be an ISO 4217 code such as USD") }
            } else if data["currency"] == nil {
                fail("currency", "is required for a money budget (ISO 4217, e.g. USD)")
            }
        case "meter":
            if let meter = text("meter") {
                if MeterDefinition.isValidName(meter) { measure = .meter(meter) } else { fail("meter", "\"\(meter)\" is not a meter name") }
            } else if data["meter"] == nil {
                fail("meter", "is required for a meter budget: the meter's name")
            }
        case nil:
            if data["measure"] == nil { fail("measure", "is required: tokens, calls, money or meter") }
        case let other?:
            fail("measure", "\"\(other)\" is not a measure: tokens, calls, money or meter")
        }
        if measure?.kind != "money", data["currency"] != nil, data["measure"]?.string != "money" { fail("currency", "is only for money budgets") }
        if measure?.kind != "meter", data["meter"] != nil, data["measure"]?.string != "meter" { fail("meter", "is only for meter budgets") }
        var limit: Int64?
        if let raw = text("limit") {
            if case .money = measure {
                if GrantEvent.isPlainDecimal(raw), let nanos = Money.nanos(raw), nanos > 0, nanos <= GrantEvent.maxAmountNanos { limit = nanos } else {
                    fail("limit", "must be an amount above 0 and below 1000000000 such as \"500.00\" (digits, at most 9 decimals)")
                }
            } else if let quantity = Int64(raw), raw.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
                      raw.utf8.first != UInt8(ascii: "0"), quantity > 0, quantity <= EventLimits.maxTokens {
                limit = quantity
            } else if measure != nil {
                fail("limit", "must be a whole number from 1 to \(EventLimits.maxTokens), as a string of digits")
            }
        } else if data["limit"] == nil {
            fail("limit", "is required: a decimal string (\"500.00\" for money, \"1000000\" for tokens or meter units)")
        }
        var alertAt: [Int] = []
        if let value = data["alert_at"] {
            if case .array(let items) = value, items.count <= BudgetDefinition.maxAlerts {
                for item in items {
                    guard case .integer(.value(let percent)) = item, BudgetDefinition.alertRange.contains(Int(percent)) else {
                        fail("alert_at", "must hold whole percentages from 1 to 1000")
                        break
                    }
                    alertAt.append(Int(percent))
                }
                alertAt = Array(Set(alertAt)).sorted()
            } else {
                fail("alert_at", "must be an array of at most \(BudgetDefinition.maxAlerts) percentages, e.g. [50, 80]")
            }
        }
        var enforced = true
        if let value = data["enforce"] {
            if case .bool(let flag) = value { enforced = flag } else { fail("enforce", "must be true (a hard limit) or false (alerts only)") }
        }
        var dimensions: [String: String] = [:]
        if let value = data["dimensions"] {
            if case .object(let members) = value, members.count <= BudgetDefinition.maxDimensions {
                for (key, member) in members.sorted(by: { $0.key < $1.key }) {
                    guard EventLimits.isLabel(key, length: EventLimits.propertyKeyLength) else {
                        fail("dimensions", "names are 1 to \(EventLimits.propertyKeyLength.upperBound) characters without control characters")
                        continue
                    }
                    guard let string = member.string, EventLimits.isLabel(string, length: 1...EventLimits.maxPropertyValueLength) else {
                        fail("dimensions.\(key)", "must be a non-empty string without control characters, at most \(EventLimits.maxPropertyValueLength) characters")
                        continue
                    }
                    dimensions[key] = string
                }
            } else {
                fail("dimensions", "must be an object of at most \(BudgetDefinition.maxDimensions) dimension values, e.g. {\"team\": \"search\"}")
            }
        }
        var per: String?
        if let value = data["per"] {
            if let key = value.string, EventLimits.isLabel(key, length: EventLimits.propertyKeyLength) {
                if dimensions[key] != nil { fail("per", "\(key) is also one of the dimensions: a budget per value of it is counted per value already") }
                per = key
            } else {
                fail("per", "must be a dimension name (1 to \(EventLimits.propertyKeyLength.upperBound) characters), e.g. \"run_id\"")
            }
        }
        var anomaly: AnomalyRule?
        if let value = data["anomaly"] {
            if case .object(let rule) = value {
                for key in rule.keys.sorted() where key != "factor" && key != "baseline_hours" {
                    fail("anomaly.\(key)", "is not a field of an anomaly rule: factor and baseline_hours are")
                }
                var factor: Int?
                if let text = rule["factor"]?.string, GrantEvent.isPlainDecimal(text), let nanos = Money.nanos(text), nanos % 10_000_000 == 0,
                   AnomalyRule.factorRange.contains(Int(nanos / 10_000_000)) {
                    factor = Int(nanos / 10_000_000)
                } else {
                    fail("anomaly.factor", "must be a decimal string above 1 and at most 1000 with at most 2 decimals, e.g. \"5\" or \"2.5\"")
                }
                var hours = 24
                if let raw = rule["baseline_hours"] {
                    if case .integer(.value(let number)) = raw, AnomalyRule.baselineRange.contains(Int(number)) { hours = Int(number) } else {
                        fail("anomaly.baseline_hours", "must be a whole number of hours from 1 to 168 (default 24)")
                    }
                }
                if let factor { anomaly = AnomalyRule(factorPercent: factor, baselineHours: hours) }
                if let period, period != .hour { fail("period", "must be hour for an anomaly watch: each hour is compared with the hours before it") }
                if data["enforce"] == .bool(true) { fail("enforce", "must be false for an anomaly watch: it alerts, it does not refuse") }
                if data["alert_at"] != nil { fail("alert_at", "is not for an anomaly watch: it alerts when an hour is anomalous") }
                enforced = false
            } else {
                fail("anomaly", "must be an object such as {\"factor\": \"5\", \"baseline_hours\": 24}")
            }
        }
        guard violations.count == before, let name, let period, let measure, let limit else { return nil }
        return (name, BudgetDefinition(name: name, period: period, measure: measure, limit: limit, alertAt: alertAt, enforced: enforced,
                                       dimensions: dimensions, per: per, anomaly: anomaly))
    }
}

extension EventEncoder {
    public static func encode(_ budget: BudgetEvent) -> [UInt8] {
        var json = JSONWriter()
        writeEnvelope(&json, id: budget.id, source: budget.source, type: EventType.budget.rawValue, subject: budget.subject,
                      time: budget.time.text, extensions: budget.extensions)
        writeBudgetData(&json, name: budget.name, definition: budget.definition)
        json.raw("}")
        return json.bytes
    }

    /// The `data` object of a `tally.budget` event.
    static func writeBudgetData(_ json: inout JSONWriter, name: String, definition: BudgetDefinition?) {
        json.raw("{")
        json.key("budget", first: true); json.string(name)
        guard let definition else {
            json.key("removed"); json.raw("true")
            json.raw("}")
            return
        }
        json.key("period"); json.string(definition.period.rawValue)
        json.key("measure"); json.string(definition.measure.kind)
        switch definition.measure {
        case .tokens, .calls: break
        case .money(let currency): json.key("currency"); json.string(currency.code)
        case .meter(let meter): json.key("meter"); json.string(meter)
        }
        json.key("limit"); json.string(definition.measure.format(definition.limit))
        if !definition.alertAt.isEmpty {
            json.key("alert_at"); json.raw("[" + definition.alertAt.map(String.init).joined(separator: ",") + "]")
        }
        json.key("enforce"); json.raw(definition.enforced ? "true" : "false")
        if !definition.dimensions.isEmpty {
            json.key("dimensions"); json.raw("{")
            for (index, (key, value)) in definition.dimensions.sorted(by: { $0.key < $1.key }).enumerated() {
                json.key(key, first: index == 0); json.string(value)
            }
            json.raw("}")
        }
        if let per = definition.per { json.key("per"); json.string(per) }
        if let anomaly = definition.anomaly {
            json.key("anomaly"); json.raw("{")
            json.key("factor", first: true); json.string(anomaly.factorText)
            json.key("baseline_hours"); json.integer(Int64(anomaly.baselineHours))
            json.raw("}")
        }
        json.raw("}")
    }
}

/// The body of `PUT /v1/customers/{customer}/budgets/{budget}` (or, with `removed`, of its
/// DELETE) turned into a `tally.budget` event: the budget's data fields plus optional `id` and
/// `time`. Send an `id` to make a retry safe (it is the idempotency key); without one, each request
/// is a declaration of its own (declaring what is already declared changes nothing). Errors name
/// the body's fields.
public enum BudgetRequest {
    public static func event(customerID: String, budget: String, body: [UInt8], removed: Bool, nowMicroseconds: Int64)
        -> Result<(BudgetEvent, [UInt8]), EventDecodingError> {
        var fields: [String: JSONValue] = [:]
        if body.contains(where: { ![0x20, 0x09, 0x0a, 0x0d].contains($0) }) {
            guard case .success(.object(let object)) = JSONValue.parse(body) else {
                return .failure(.invalid([FieldViolation("", "the body must be a JSON object")]))
            }
            fields = object
        }
        var violations: [FieldViolation] = []
        var envelope: [String: String] = [:]
        for name in ["id", "time"] {
            guard let value = fields.removeValue(forKey: name) else { continue }
            if let text = value.string { envelope[name] = text } else { violations.append(FieldViolation(name, "must be a string")) }
        }
        if let named = fields["budget"], named != .string(budget) {
            violations.append(FieldViolation("budget", "must be the budget named in the path (\(budget)) or left out"))
        }
        fields["budget"] = .string(budget)
        if removed {
            for name in fields.keys.sorted() where name != "budget" { violations.append(FieldViolation(name, "is not a field of a removal: id and time are")) }
            fields["removed"] = .bool(true)
        } else if fields["removed"] != nil {
            violations.append(FieldViolation("removed", "is not a field here: DELETE the budget to remove it"))
        }
        guard violations.isEmpty else { return .failure(.invalid(violations)) }
        guard let (name, definition) = BudgetEvent.decodeData(.object(fields), prefix: "", violations: &violations) else {
            return .failure(.invalid(violations))
        }
        var data = JSONWriter()
        EventEncoder.writeBudgetData(&data, name: name, definition: definition)
        // Not derived from the content: declaring A, then B, then A again must be three declarations.
        let id = envelope["id"] ?? "budget-\(name)-\(nowMicroseconds)-\(UInt32.random(in: 0...UInt32.max))"
        var json = JSONWriter()
        EventEncoder.writeEnvelope(&json, id: id, source: "tally-ingest", type: EventType.budget.rawValue, subject: customerID,
                                   time: envelope["time"] ?? EventTime.format(microseconds: nowMicroseconds))
        json.raw(data.bytes)
        json.raw("}")
        switch EventDecoder.decode(json.bytes) {
        case .success(.budget(let event)): return .success((event, json.bytes))
        case .success: return .failure(.invalid([FieldViolation("", "not a budget")]))
        case .failure(let error):
            return .failure(.invalid(error.violations.map { FieldViolation($0.path.hasPrefix("data.") ? String($0.path.dropFirst(5)) : $0.path, $0.reason) }))
        }
    }
}
