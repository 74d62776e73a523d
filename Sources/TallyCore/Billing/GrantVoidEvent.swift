/// Voids a wallet grant: what is left of its credit is written off (ledger kind `void`); credit
/// already drawn stays drawn, since it paid for usage. Type `tally.wallet.grant.void`, schema
/// `schemas/wallet-grant-void.v1.json`, keyed by the customer like the grant it voids.
///
/// Its own id is its idempotency key; the API and CLI use `GrantVoidEvent.id(voiding:)`, so
/// voiding a grant twice voids it once. A void of a grant with nothing left (used up, expired,
/// voided, or never credited) changes nothing and is kept in `tally.unrateable_records` with why.
public struct GrantVoidEvent: Hashable, Sendable {
    public var id: String
    public var source: String
    public var subject: String
    public var time: EventTime
    /// The id of the grant voided.
    public var grantID: String
    /// Why, for people (at most 1024 characters).
    public var reason: String?
    public var extensions: [String: String]

    public init(id: String, source: String, subject: String, time: EventTime, grantID: String, reason: String? = nil,
                extensions: [String: String] = [:]) {
        self.id = id
        self.source = source
        self.subject = subject
        self.time = time
        self.grantID = grantID
        self.reason = reason
        self.extensions = extensions
    }

    public var customerID: String { subject }

    public static let maxReasonLength = 1024

    /// The id every tool gives the void of `grantID`: `void-<grant id>`, or for a grant id too
    /// long for that, `void-` and the grant id's 64-bit fingerprint.
    public static func id(voiding grantID: String) -> String {
        let plain = "void-" + grantID
        if EventLimits.idLength.contains(plain.utf8.count) { return plain }
        var hash = ContentHash.FNV()
        hash.add(grantID)
        return "void-" + String(hash.value, radix: 16)
    }
}

extension EventEncoder {
    public static func encode(_ void: GrantVoidEvent) -> [UInt8] {
        var json = JSONWriter()
        writeEnvelope(&json, id: void.id, source: void.source, type: EventType.walletGrantVoid.rawValue, subject: void.subject,
                      time: void.time.text, extensions: void.extensions)
        json.raw("{")
        json.key("grant_id", first: true); json.string(void.grantID)
        if let reason = void.reason { json.key("reason"); json.string(reason) }
        json.raw("}}")
        return json.bytes
    }
}

/// The body of `POST /v1/wallets/{customer}/grants/{grant}/void` turned into a
/// `tally.wallet.grant.void` event: `{"id": "...", "reason": "...", "time": "..."}`, all optional
/// (id defaults to `GrantVoidEvent.id(voiding:)`, time to now; a second void of a grant whose
/// first found nothing to void needs an id of its own); an empty body is `{}`. Validated by the
/// event decoder; errors name the body's fields.
public enum GrantVoidRequest {
    public static func event(customerID: String, grantID: String, body: [UInt8], nowMicroseconds: Int64)
        -> Result<(GrantVoidEvent, [UInt8]), EventDecodingError> {
        var fields: [String: JSONValue] = [:]
        if body.contains(where: { ![0x20, 0x09, 0x0a, 0x0d].contains($0) }) {
            guard case .success(.object(let object)) = JSONValue.parse(body) else {
                return .failure(.invalid([FieldViolation("", "the body must be a JSON object (or empty)")]))
            }
            fields = object
        }
        var violations: [FieldViolation] = []
        for name in fields.keys.sorted() where !["id", "reason", "time"].contains(name) {
            violations.append(FieldViolation(name, "is not a field of a void: id, reason and time are"))
        }
        var text: [String: String] = [:]
        for name in ["id", "reason", "time"] {
            guard let value = fields[name] else { continue }
            if let string = value.string { text[name] = string } else { violations.append(FieldViolation(name, "must be a string")) }
        }
        guard violations.isEmpty else { return .failure(.invalid(violations)) }
        var json = JSONWriter()
        json.raw("{")
        json.key("specversion", first: true); json.string("1.0")
        json.key("id"); json.string(text["id"] ?? GrantVoidEvent.id(voiding: grantID))
        json.key("source"); json.string("tally-ingest")
        json.key("type"); json.string(EventType.walletGrantVoid.rawValue)
        json.key("subject"); json.string(customerID)
        json.key("time"); json.string(text["time"] ?? EventTime.format(microseconds: nowMicroseconds))
        json.key("data")
        json.raw("{")
        json.key("grant_id", first: true); json.string(grantID)
        if let reason = text["reason"] { json.key("reason"); json.string(reason) }
        json.raw("}}")
        switch EventDecoder.decode(json.bytes) {
        case .success(.grantVoid(let void)): return .success((void, json.bytes))
        case .success: return .failure(.invalid([FieldViolation("", "not a void")]))
        case .failure(let error):
            return .failure(.invalid(error.violations.map { violation in
                let field = violation.path == "data.grant_id" ? "grant" : violation.path.hasPrefix("data.") ? String(violation.path.dropFirst(5)) : violation.path
                return FieldViolation(field, violation.reason)
            }))
        }
    }
}
