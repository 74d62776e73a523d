/// What happens when a wallet runs out of credit.
public enum OveragePolicy: Hashable, Sendable {
    /// Usage keeps being charged below zero; calls are refused once the balance is below `-limit`
    /// (never, when the limit is nil).
    case allow(limitNanos: Int64?)
    /// Calls are refused as soon as the balance is zero or below (usage that still arrives is charged).
    case stop

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
