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
    /// Below 1e9 currency units per grant, so sums of grants stay far inside Int64 nano-units.
    public static let maxAmountNanos: Int64 = 1_000_000_000 * Money.nanosPerUnit - 1

    /// `digits[.digits]` without sign, exponent or leading zeros: the schema's amount pattern.
    public static func isPlainDecimal(_ text: String) -> Bool {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count <= 2, let whole = parts.first, !whole.isEmpty, whole.count <= 9,
              whole.allSatisfy(\.isASCIIDigit), whole == "0" || whole.first != "0" else { return false }
        guard parts.count == 2 else { return true }
        return (1...9).contains(parts[1].count) && parts[1].allSatisfy(\.isASCIIDigit)
    }

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
        writeEnvelope(&json, id: grant.id, source: grant.source, type: EventType.walletGrant.rawValue, subject: grant.subject,
                      time: grant.time.text, extensions: grant.extensions)
        json.raw("{")
        json.key("amount", first: true); json.string(Money.format(nanos: grant.amountNanos))
        json.key("currency"); json.string(grant.currency.code)
        json.key("priority"); json.integer(grant.priority)
        if let expiresAt = grant.expiresAt { json.key("expires_at"); json.string(expiresAt.text) }
        json.key("source"); json.string(grant.grantSource.rawValue)
        json.raw("}}")
        return json.bytes
    }
}

/// The body of `POST /v1/wallets/{customer}/grants` turned into a `tally.wallet.grant` event:
/// `{"id": "...", "amount": "25.00", "currency": "USD", "priority": 10, "expires_at": "...",
/// "source": "purchase", "time": "..."}` (time defaults to now). Validated by the event decoder,
/// so the API and the consumers apply the same rules; errors name the body's fields.
public enum GrantRequest {
    public static func event(customerID: String, body: [UInt8], nowMicroseconds: Int64) -> Result<(GrantEvent, [UInt8]), EventDecodingError> {
        guard case .success(let root) = JSONValue.parse(body) else { return .failure(.invalid([FieldViolation("", "the body must be a JSON object")])) }
        guard case .object(let fields) = root else { return .failure(.invalid([FieldViolation("", "the body must be a JSON object")])) }
        var json = JSONWriter()
        json.raw("{")
        json.key("specversion", first: true); json.string("1.0")
        json.key("source"); json.string("tally-ingest")
        json.key("type"); json.string(EventType.walletGrant.rawValue)
        json.key("subject"); json.string(customerID)
        if fields["time"] == nil { json.key("time"); json.string(EventTime.format(microseconds: nowMicroseconds)) }
        var data = JSONWriter()
        data.raw("{")
        var dataIsEmpty = true
        var violations: [FieldViolation] = []
        func write(_ value: JSONValue, _ name: String, to writer: inout JSONWriter) {
            switch value {
            case .string(let text): writer.string(text)
            case .integer(.value(let number)): writer.integer(number)
            default:
                writer.raw("null")
                violations.append(FieldViolation(name, "must be a string (amounts are decimal strings such as \"25.00\") or, for priority, an integer"))
            }
        }
        for (name, value) in fields.sorted(by: { $0.key < $1.key }) {
            if name == "id" || name == "time" {
                json.key(name)
                write(value, name, to: &json)
            } else {
                data.key(name, first: dataIsEmpty)
                dataIsEmpty = false
                write(value, name, to: &data)
            }
        }
        data.raw("}")
        json.key("data"); json.raw(data.bytes)
        json.raw("}")
        switch EventDecoder.decode(json.bytes) {
        case .success(.grant(let grant)) where violations.isEmpty: return .success((grant, json.bytes))
        case .success: break
        case .failure(let error):
            // The body's own field names ("amount", not "data.amount"); fields already reported keep the first reason.
            for violation in error.violations {
                let field = violation.path.hasPrefix("data.") ? String(violation.path.dropFirst(5)) : violation.path
                if !violations.contains(where: { $0.path == field }) {
                    violations.append(FieldViolation(field, field == "id" && fields["id"] == nil ? "is required: the grant's idempotency key" : violation.reason))
                }
            }
        }
        return .failure(.invalid(violations))
    }
}

extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}
