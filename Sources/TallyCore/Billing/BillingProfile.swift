/// What happens when a wallet runs out of credit.
public enum OveragePolicy: Hashable, Sendable {
    /// Usage keeps being charged below zero; calls are refused once the balance is below `-limit`
    /// (never, when the limit is nil).
    case allow(limitNanos: Int64?)
    /// Calls are refused as soon as the balance is zero or below (usage that still arrives is charged).
    case stop

    /// `allow` or `stop`, as settings name it.
    public var name: String {
        switch self {
        case .allow: "allow"
        case .stop: "stop"
        }
    }

    /// How far below zero `allow` lets a balance go (nil: no limit, or `stop`).
    public var limitNanos: Int64? {
        if case .allow(let limit) = self { return limit }
        return nil
    }

    /// Whether a gateway should refuse calls at this balance.
    public func blocks(balanceNanos: Int64) -> Bool {
        switch self {
        case .allow(let limit): limit.map { balanceNanos < -$0 } ?? false
        case .stop: balanceNanos <= 0
        }
    }
}

/// A rule that asks for more credit when a balance falls below a threshold.
public struct AutoTopUpRule: Hashable, Sendable {
    public let belowNanos: Int64
    public let amountNanos: Int64

    public init(belowNanos: Int64, amountNanos: Int64) {
        self.belowNanos = belowNanos
        self.amountNanos = amountNanos
    }
}

/// A customer's billing settings (`tally customers set`); customers without a row get the defaults.
public struct BillingProfile: Hashable, Sendable {
    public var customerID: String
    /// The price book (plan) the customer is rated with.
    public var plan = "default"
    public var currency = Currency("USD")!
    /// Day of the month (1–28, UTC) on which billing periods start.
    public var anchorDay = 1
    public var subscriptionFeeNanos: Int64 = 0
    public var overage = OveragePolicy.allow(limitNanos: nil)
    /// Low-balance alert thresholds, in the wallet's currency.
    public var lowBalanceThresholdsNanos: [Int64] = []
    public var autoTopUp: AutoTopUpRule?

    public init(customerID: String) { self.customerID = customerID }

    /// The billing period holding `microseconds`.
    public func period(containing microseconds: Int64) -> BillingPeriod {
        BillingPeriod.containing(microseconds, anchorDay: anchorDay)
    }
}

/// A monthly billing period `[start, end)` in UTC, starting on an anchor day.
public struct BillingPeriod: Hashable, Sendable, Comparable {
    public let start: Int64
    public let end: Int64

    public init(start: Int64, end: Int64) {
        self.start = start
        self.end = end
    }

    public static func < (a: BillingPeriod, b: BillingPeriod) -> Bool { a.start < b.start }

    static let microsecondsPerDay: Int64 = 86_400_000_000

    /// The period that starts on `anchorDay` of the given month.
    public static func starting(year: Int, month: Int, anchorDay: Int) -> BillingPeriod {
        let start = Int64(EventTime.daysFromCivil(year: year, month: month, day: anchorDay)) * microsecondsPerDay
        let (nextYear, nextMonth) = month == 12 ? (year + 1, 1) : (year, month + 1)
        let end = Int64(EventTime.daysFromCivil(year: nextYear, month: nextMonth, day: anchorDay)) * microsecondsPerDay
        return BillingPeriod(start: start, end: end)
    }

    public static func containing(_ microseconds: Int64, anchorDay: Int) -> BillingPeriod {
        let days = Int(microseconds >= 0 ? microseconds / microsecondsPerDay : (microseconds - microsecondsPerDay + 1) / microsecondsPerDay)
        let (year, month, day) = EventTime.civil(fromDays: days)
        if day >= anchorDay { return starting(year: year, month: month, anchorDay: anchorDay) }
        return month == 1 ? starting(year: year - 1, month: 12, anchorDay: anchorDay) : starting(year: year, month: month - 1, anchorDay: anchorDay)
    }

    /// "2026-11" for the period starting in November 2026.
    public var label: String { String(EventTime.format(microseconds: start).prefix(7)) }

    /// Parses "YYYY-MM" into the period starting in that month on `anchorDay`.
    public static func parse(_ label: String, anchorDay: Int) -> BillingPeriod? {
        let parts = label.split(separator: "-")
        guard parts.count == 2, parts[0].count == 4, parts[1].count == 2, let year = Int(parts[0]), let month = Int(parts[1]),
              (1...12).contains(month), year >= 1970 else { return nil }
        return starting(year: year, month: month, anchorDay: anchorDay)
    }
}

/// Billing settings refused: every field at fault with the reason.
public struct InvalidSettings: Error, Sendable, Equatable {
    public let violations: [FieldViolation]
}

/// A change to a customer's billing settings: each field given replaces the stored one, the rest
/// stay. The API's `PATCH /v1/customers/{customer}` reads it from JSON, `tally customers set`
/// from its options; both validate it here, so both refuse the same values with the same reasons.
public struct BillingSettingsChange: Sendable, Equatable {
    /// The price book (plan) the customer is rated with.
    public var plan: String?
    /// ISO 4217 code.
    public var currency: String?
    /// 1 to 28.
    public var anchorDay: Int64?
    /// Decimal amounts (at most 9 decimals), at least 0.
    public var subscriptionFee: String?
    /// `allow` or `stop`.
    public var overagePolicy: String?
    /// How far below zero `allow` lets a balance go; `.some(nil)` for no limit.
    public var overageLimit: String??
    public var lowBalanceThresholds: [String]?
    /// `.some(nil)` removes the rule.
    public var autoTopUp: AutoTopUp??

    public struct AutoTopUp: Sendable, Equatable {
        public var below: String
        public var amount: String
        public init(below: String, amount: String) {
            self.below = below
            self.amount = amount
        }
    }

    public init() {}

    /// The fields of the JSON form, as `PATCH /v1/customers/{customer}` takes them.
    public static let fields = ["plan", "currency", "billing_anchor_day", "subscription_fee", "overage_policy", "overage_limit",
                                "low_balance_thresholds", "auto_topup"]

    /// Reads the JSON form: `{"plan": "pro", "overage_limit": null, "auto_topup": {"below": "5", "amount": "50"}, …}`.
    /// Every field at fault is named; unknown fields are refused.
    public static func parse(json bytes: [UInt8]) -> Result<BillingSettingsChange, InvalidSettings> {
        let (change, violations) = read(bytes)
        return violations.isEmpty ? .success(change) : .failure(InvalidSettings(violations: violations))
    }

    /// `profile` with the JSON form's change, or every field at fault: those the form gets
    /// wrong and those whose values are out of range, together.
    public static func apply(json bytes: [UInt8], to profile: BillingProfile) -> Result<BillingProfile, InvalidSettings> {
        let (change, violations) = read(bytes)
        switch change.applied(to: profile) {
        case .success(let changed): return violations.isEmpty ? .success(changed) : .failure(InvalidSettings(violations: violations))
        case .failure(let more): return .failure(InvalidSettings(violations: violations + more.violations))
        }
    }

    /// The change the fields that are well formed make, and the others' violations.
    private static func read(_ bytes: [UInt8]) -> (BillingSettingsChange, [FieldViolation]) {
        guard case .success(.object(let members)) = JSONValue.parse(bytes) else {
            return (BillingSettingsChange(), [FieldViolation("", "the body must be a JSON object of billing settings")])
        }
        var change = BillingSettingsChange()
        var violations: [FieldViolation] = []
        func text(_ name: String) -> String? {
            guard let value = members[name] else { return nil }
            guard let string = value.string else { violations.append(FieldViolation(name, "must be a string")); return nil }
            return string
        }
        for name in members.keys.sorted() where !fields.contains(name) {
            violations.append(FieldViolation(name, "is not a billing setting: \(fields.joined(separator: ", ")) are"))
        }
        change.plan = text("plan")
        change.currency = text("currency")
        if let value = members["billing_anchor_day"] {
            if case .integer(.value(let day)) = value { change.anchorDay = day } else { violations.append(FieldViolation("billing_anchor_day", "must be a whole number from 1 to 28")) }
        }
        change.subscriptionFee = text("subscription_fee")
        change.overagePolicy = text("overage_policy")
        if let value = members["overage_limit"] {
            if case .null = value { change.overageLimit = .some(nil) } else { change.overageLimit = text("overage_limit").map { .some($0) } }
        }
        if let value = members["low_balance_thresholds"] {
            if case .array(let items) = value, items.count <= 16, items.allSatisfy({ $0.string != nil }) {
                change.lowBalanceThresholds = items.compactMap(\.string)
            } else {
                violations.append(FieldViolation("low_balance_thresholds", "must be an array of at most 16 decimal strings"))
            }
        }
        if let value = members["auto_topup"] {
            switch value {
            case .null: change.autoTopUp = .some(nil)
            case .object(let rule):
                if let below = rule["below"]?.string, let amount = rule["amount"]?.string, rule.count == 2 {
                    change.autoTopUp = .some(AutoTopUp(below: below, amount: amount))
                } else {
                    violations.append(FieldViolation("auto_topup", "must be null or {\"below\": \"5.00\", \"amount\": \"50.00\"}"))
                }
            default: violations.append(FieldViolation("auto_topup", "must be null or {\"below\": \"5.00\", \"amount\": \"50.00\"}"))
            }
        }
        return (change, violations)
    }

    /// `profile` with the change, or every field at fault (named as in the JSON form).
    public func applied(to profile: BillingProfile) -> Result<BillingProfile, InvalidSettings> {
        var profile = profile
        var violations: [FieldViolation] = []
        func amount(_ text: String, _ field: String, positive: Bool = false) -> Int64? {
            // Digits with at most 9 decimals, up to what a stored amount holds (Int64 nano-units).
            let plain = text.range(of: #"^[0-9]+(\.[0-9]{1,9})?$"#, options: .regularExpression) != nil
            guard plain, let nanos = Money.nanos(text), positive ? nanos > 0 : nanos >= 0 else {
                violations.append(FieldViolation(field, "must be a decimal amount\(positive ? " above 0" : "") with at most 9 decimals, at most 9,223,372,036.854775807, e.g. \"25.00\""))
                return nil
            }
            return nanos
        }
        if let plan {
            if EventLimits.isLabel(plan, length: EventLimits.labelLength) { profile.plan = plan } else {
                violations.append(FieldViolation("plan", "must be a price book name: 1 to \(EventLimits.labelLength.upperBound) characters without control characters"))
            }
        }
        if let currency {
            if let code = Currency(currency) { profile.currency = code } else { violations.append(FieldViolation("currency", "must be an ISO 4217 code such as USD")) }
        }
        if let anchorDay {
            if (1...28).contains(anchorDay) { profile.anchorDay = Int(anchorDay) } else { violations.append(FieldViolation("billing_anchor_day", "must be a whole number from 1 to 28")) }
        }
        if let subscriptionFee, let nanos = amount(subscriptionFee, "subscription_fee") { profile.subscriptionFeeNanos = nanos }
        var limit: Int64?
        if case .allow(let current) = profile.overage { limit = current }
        if let overageLimit { limit = overageLimit.flatMap { amount($0, "overage_limit") } }
        switch overagePolicy {
        case nil: if case .allow = profile.overage { profile.overage = .allow(limitNanos: limit) }
        case "allow": profile.overage = .allow(limitNanos: limit)
        case "stop": profile.overage = .stop
        case let other?: violations.append(FieldViolation("overage_policy", "must be allow or stop, not \(other)"))
        }
        if let lowBalanceThresholds {
            profile.lowBalanceThresholdsNanos = lowBalanceThresholds.enumerated().compactMap { amount($1, "low_balance_thresholds.\($0)") }
        }
        if let autoTopUp {
            if let rule = autoTopUp {
                if let below = amount(rule.below, "auto_topup.below"), let topUp = amount(rule.amount, "auto_topup.amount", positive: true) {
                    profile.autoTopUp = AutoTopUpRule(belowNanos: below, amountNanos: topUp)
                }
            } else {
                profile.autoTopUp = nil
            }
        }
        return violations.isEmpty ? .success(profile) : .failure(InvalidSettings(violations: violations))
    }
}
