/// Where a grant of credit came from.
public enum GrantSource: String, Sendable, CaseIterable {
    case purchase, promotion
    /// Bought by an auto top-up rule (`tally.topup_requests`) or a manual top-up.
    case topUp = "top_up"
}

/// Prepaid credit added to a customer's wallet: schema `schemas/wallet-grant.v1.json`, type
/// `tally.wallet.grant`. It travels in the usage topic, keyed by the customer, so the rater
/// sees credit and usage in one order; its id is its idempotency key.
public struct GrantEvent: Hashable, Sendable {
    public var id: String
    public var source: String
    public var subject: String
    public var time: EventTime
    public var amountNanos: Int64
    public var currency: Currency
    /// Grants with the lowest priority number are drawn first.
    public var priority: Int64
    /// Event time at which any remainder is written off; nil for credit that never expires.
    public var expiresAt: EventTime?
    public var grantSource: GrantSource
    public var extensions: [String: String]

    public static let defaultPriority: Int64 = 100
    public static let priorityRange: ClosedRange<Int64> = 0...1_000_000
    /// At most 1e9 currency units per grant, so sums of grants stay far inside Int64 nano-units.
    public static let maxAmountNanos: Int64 = 1_000_000_000 * Money.nanosPerUnit

    public init(id: String, source: String, subject: String, time: EventTime, amountNanos: Int64, currency: Currency,
                priority: Int64 = GrantEvent.defaultPriority, expiresAt: EventTime? = nil, grantSource: GrantSource = .purchase,
                extensions: [String: String] = [:]) {
        self.id = id
        self.source = source
        self.subject = subject
        self.time = time
        self.amountNanos = amountNanos
        self.currency = currency
        self.priority = priority
        self.expiresAt = expiresAt
        self.grantSource = grantSource
        self.extensions = extensions
    }

    public var customerID: String { subject }
}

extension EventEncoder {
    public static func encode(_ grant: GrantEvent) -> [UInt8] {
        var json = JSONWriter()
        json.raw("{")
        json.key("specversion", first: true); json.string("1.0")
        json.key("id"); json.string(grant.id)
        json.key("source"); json.string(grant.source)
        json.key("type"); json.string(EventType.walletGrant.rawValue)
        json.key("subject"); json.string(grant.subject)
        json.key("time"); json.string(grant.time.text)
        for (name, rawValue) in grant.extensions.sorted(by: { $0.key < $1.key }) {
            json.key(name); json.raw(rawValue)
        }
        json.key("data"); json.raw("{")
        json.key("amount", first: true); json.string(Money.format(nanos: grant.amountNanos))
        json.key("currency"); json.string(grant.currency.code)
        json.key("priority"); json.integer(grant.priority)
        if let expiresAt = grant.expiresAt { json.key("expires_at"); json.string(expiresAt.text) }
        json.key("source"); json.string(grant.grantSource.rawValue)
        json.raw("}}")
        return json.bytes
    }
}
