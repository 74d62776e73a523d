/// Decodes and validates events (schema v1) from JSON bytes, without `Foundation`.
///
/// Enforces every rule of `schemas/usage-event.v1.json`, plus two the JSON
/// Schema cannot express: cache read + cache write ≤ input, and reasoning ≤
/// output; and it rejects duplicate keys, which JSON parsers resolve differently.
public enum EventDecoder {
    public static func decode(_ bytes: [UInt8]) -> Result<TallyEvent, EventDecodingError> {
        bytes.withUnsafeBufferPointer { decode($0) }
    }

    public static func decode(_ text: String) -> Result<TallyEvent, EventDecodingError> {
        decode(Array(text.utf8))
    }

    public static func decode(_ bytes: UnsafeBufferPointer<UInt8>) -> Result<TallyEvent, EventDecodingError> {
        var reader = JSONReader(bytes)
        do {
            var state = EnvelopeState()
            try decodeEnvelope(&reader, &state)
            try reader.finish()
            return state.finish(bytes: bytes)
        } catch {
            return .failure(.malformedJSON(error))
        }
    }

    /// Decodes one JSON value from `reader` as an event; used for arrays of events.
    static func decodeValue(_ reader: inout JSONReader) throws(JSONSyntaxError) -> Result<TallyEvent, EventDecodingError> {
        var state = EnvelopeState()
        try decodeEnvelope(&reader, &state)
        return state.finish(bytes: reader.bytes)
    }

    private static func decodeEnvelope(_ reader: inout JSONReader, _ state: inout EnvelopeState) throws(JSONSyntaxError) {
        guard try reader.peekKind() == .object else {
            try reader.skipValue()
            state.violations.append(FieldViolation("", "an event must be a JSON object"))
            state.notAnObject = true
            return
        }
        // One bit per `EnvelopeField`; other members are kept in `extensions`, which catches theirs.
        var seen: UInt32 = 0
        let fields = EnvelopeField.names
        try reader.readMembers { (reader: inout JSONReader, name: JSONKey) throws(JSONSyntaxError) in
            guard let (field, bit) = fields.named(name) else {
                let key = name.string
                let range = try reader.skipValue()
                guard state.extensions[key] == nil else { throw reader.error("duplicate key \"\(key)\"") }
                state.extensions[key] = String(decoding: UnsafeBufferPointer(rebasing: reader.bytes[range]), as: UTF8.self)
                return
            }
            let key = field.rawValue
            switch field {
            case .specversion:
                state.sawSpecversion = true
                if let value = try state.string(&reader, key, length: 1...16), value != "1.0" {
                    state.violations.append(FieldViolation(key, "must be \"1.0\""))
                }
            case .id: state.id = try state.string(&reader, key, length: EventLimits.idLength, label: true)
            case .source: state.source = try state.string(&reader, key, length: EventLimits.sourceLength, label: true)
            case .subject: state.subject = try state.string(&reader, key, length: EventLimits.subjectLength, label: true)
            case .type:
                if let value = try state.string(&reader, key, length: 1...256) {
                    if let type = EventType(rawValue: value) {
                        state.type = type
                    } else {
                        let known = EventType.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")
                        state.violations.append(FieldViolation(key, "unknown event type; expected one of \(known)"))
                    }
                }
            case .time:
                if let value = try state.string(&reader, key, length: 1...64) {
                    if let time = EventTime(value) {
                        state.time = time
                    } else {
                        state.violations.append(FieldViolation(key, "must be an RFC 3339 date-time with offset, e.g. 2026-01-01T12:00:00Z"))
                    }
                }
            case .data:
                state.sawData = true
                switch state.type {
                case .usage:
                    try state.usage.decode(&reader, &state.violations)
                    state.dataDecoded = true
                case .walletGrant:
                    try state.grant.decode(&reader, &state.violations)
                    state.dataDecoded = true
                case .walletGrantVoid:
                    try state.void.decode(&reader, &state.violations)
                    state.dataDecoded = true
                case .budget:
                    // Rare and irregular: read as a tree once the envelope is complete.
                    state.dataRange = try reader.skipValue()
                case nil:
                    // Type not known yet: keep the span, decode it once the envelope is read.
                    state.dataRange = try reader.skipValue()
                }
            }
            guard seen & bit == 0 else { throw reader.error("duplicate key \"\(key)\"") }
            seen |= bit
        }
    }
}

/// What the envelope decoder has gathered so far.
private struct EnvelopeState {
    var violations: [FieldViolation] = []
    var notAnObject = false
    var sawSpecversion = false
    var id: String?
    var source: String?
    var subject: String?
    var type: EventType?
    var time: EventTime?
    var sawData = false
    var dataDecoded = false
    var dataRange: Range<Int>?
    var usage = UsageDataState()
    var grant = GrantDataState()
    var void = GrantVoidDataState()
    var budget: (name: String, definition: BudgetDefinition?)?
    var extensions: [String: String] = [:]
    var missing: [String] = []

    mutating func string(_ reader: inout JSONReader, _ path: String, length: ClosedRange<Int>, label: Bool = false) throws(JSONSyntaxError) -> String? {
        try readString(&reader, path, length: length, forbidControl: label, violations: &violations)
    }

    mutating func finish(bytes: UnsafeBufferPointer<UInt8>) -> Result<TallyEvent, EventDecodingError> {
        if notAnObject { return .failure(.invalid(violations)) }
        if let dataRange, let type {
            var reader = JSONReader(UnsafeBufferPointer(rebasing: bytes[..<dataRange.upperBound]))
            reader.index = dataRange.lowerBound
            // The span was already read once, so it is well-formed.
            switch type {
            case .usage: try? usage.decode(&reader, &violations)
            case .walletGrant: try? grant.decode(&reader, &violations)
            case .walletGrantVoid: try? void.decode(&reader, &violations)
            case .budget:
                do throws(JSONSyntaxError) {
                    budget = BudgetEvent.decodeData(try JSONValue.read(&reader, depth: 1), prefix: "data.", violations: &violations)
                } catch {
                    violations.append(FieldViolation("data", error.description))
                }
            }
            dataDecoded = true
        }
        if !(sawSpecversion && id != nil && source != nil && type != nil && subject != nil && time != nil && sawData) {
            for (name, present) in [("specversion", sawSpecversion), ("id", id != nil), ("source", source != nil), ("type", type != nil),
                                    ("subject", subject != nil), ("time", time != nil), ("data", sawData)] where !present {
                // A present but invalid field has its own violation already.
                if !violations.contains(where: { $0.path == name }) {
                    violations.append(FieldViolation(name, "is required"))
                }
            }
        }
        if dataDecoded {
            switch type {
            case .usage: usage.finish(&violations)
            case .walletGrant: grant.finish(&violations, eventTime: time)
            case .walletGrantVoid: void.finish(&violations)
            case .budget, nil: break
            }
        }
        guard violations.isEmpty, let id, let source, let subject, let time else { return .failure(.invalid(violations)) }
        if type == .walletGrant {
            guard let amount = grant.amountNanos, let currency = grant.currency, let grantSource = grant.source else {
                return .failure(.invalid(violations))
            }
            return .success(.grant(GrantEvent(
                id: id, source: source, subject: subject, time: time, amountNanos: amount, currency: currency,
                priority: grant.priority ?? GrantEvent.defaultPriority, expiresAt: grant.expiresAt, grantSource: grantSource,
                extensions: extensions)))
        }
        if type == .walletGrantVoid {
            guard let grantID = void.grantID else { return .failure(.invalid(violations)) }
            return .success(.grantVoid(GrantVoidEvent(id: id, source: source, subject: subject, time: time, grantID: grantID,
                                                      reason: void.reason, extensions: extensions)))
        }
        if type == .budget {
            guard let budget else { return .failure(.invalid(violations)) }
            return .success(.budget(BudgetEvent(id: id, source: source, subject: subject, time: time, name: budget.name,
                                                definition: budget.definition, extensions: extensions)))
        }
        guard type == .usage else { return .failure(.invalid(violations)) }
        // A meter-only event (checked in `finish`) has no model and no tokens.
        let model = usage.model ?? "", input = usage.inputTokens ?? 0, output = usage.outputTokens ?? 0
        return .success(.usage(UsageEvent(
            id: id, source: source, subject: subject, time: time, model: model,
            provider: usage.provider, feature: usage.feature, environment: usage.environment,
            inputTokens: input, outputTokens: output,
            cacheReadInputTokens: usage.cacheRead ?? 0, cacheWriteInputTokens: usage.cacheWrite ?? 0,
            cacheWrite1hInputTokens: usage.cacheWrite1h ?? 0,
            reasoningOutputTokens: usage.reasoning ?? 0, properties: usage.properties, meters: usage.meters, extensions: extensions)))
    }
}

/// The `data` object of an `llm.usage` event.
private struct UsageDataState {
    var model: String?
    var provider: String?
    var feature: String?
    var environment: String?
    var inputTokens: Int64?
    var outputTokens: Int64?
    var cacheRead: Int64?
    var cacheWrite: Int64?
    var cacheWrite1h: Int64?
    var reasoning: Int64?
    var properties: [String: String] = [:]
    var meters: [String: Int64] = [:]
    var isObject = false

    mutating func decode(_ reader: inout JSONReader, _ violations: inout [FieldViolation]) throws(JSONSyntaxError) {
        isObject = try readDataObject(&reader, &violations) { (reader: inout JSONReader, field: UsageField?, name: JSONKey, violations: inout [FieldViolation]) throws(JSONSyntaxError) in
            // Built only when a violation needs it: most events have none.
            let path = { "data." + name.string }
            switch field {
            case .model: model = try readString(&reader, path(), length: EventLimits.modelLength, forbidControl: true, violations: &violations)
            case .provider: provider = try readString(&reader, path(), length: EventLimits.labelLength, forbidControl: true, violations: &violations)
            case .feature: feature = try readString(&reader, path(), length: EventLimits.labelLength, forbidControl: true, violations: &violations)
            case .environment: environment = try readString(&reader, path(), length: EventLimits.labelLength, forbidControl: true, violations: &violations)
            case .inputTokens: inputTokens = try readTokens(&reader, path(), &violations)
            case .outputTokens: outputTokens = try readTokens(&reader, path(), &violations)
            case .cacheReadInputTokens: cacheRead = try readTokens(&reader, path(), &violations)
            case .cacheWriteInputTokens: cacheWrite = try readTokens(&reader, path(), &violations)
            case .cacheWrite1hInputTokens: cacheWrite1h = try readTokens(&reader, path(), &violations)
            case .reasoningOutputTokens: reasoning = try readTokens(&reader, path(), &violations)
            case .properties: try readProperties(&reader, &violations)
            case .meters: try readMeters(&reader, &violations)
            case nil:
                try reader.skipValue()
                violations.append(FieldViolation(path(), "is not a field of llm.usage data"))
            }
        }
    }

    private mutating func readProperties(_ reader: inout JSONReader, _ violations: inout [FieldViolation]) throws(JSONSyntaxError) {
        let kind = try reader.peekKind()
        guard kind == .object else {
            try reader.skipValue()
            violations.append(FieldViolation("data.properties", "must be an object of strings, found \(kind.name)"))
            return
        }
        var count = 0
        // One allocation (8 buckets) for the usual handful of properties instead of a rehash at 2 and 4.
        properties.reserveCapacity(6)
        try reader.readObject { (reader: inout JSONReader, key: String) throws(JSONSyntaxError) in
            count += 1
            // Built only when a violation needs it: most events have none.
            let path = { "data.properties." + key }
            if properties[key] != nil { throw reader.error("duplicate key \"\(key)\"") }
            // An ASCII key (the usual one) has as many scalars as bytes.
            let keyLength = key.utf8.allSatisfy({ $0 < 0x80 }) ? key.utf8.count : key.unicodeScalars.count
            if !EventLimits.propertyKeyLength.contains(keyLength) {
                violations.append(FieldViolation(path(), "property names must be 1 to \(EventLimits.propertyKeyLength.upperBound) characters"))
            } else if containsControl(key) {
                violations.append(FieldViolation(path(), "property names must not contain control characters"))
            }
            if let value = try readString(&reader, path(), length: 0...EventLimits.maxPropertyValueLength, forbidControl: false, violations: &violations) {
                if value.utf8.contains(0) {
                    violations.append(FieldViolation(path(), "must not contain NUL"))
                } else {
                    properties[key] = value
                }
            }
        }
        if count > EventLimits.maxProperties {
            violations.append(FieldViolation("data.properties", "must have at most \(EventLimits.maxProperties) entries"))
        }
    }

    /// `meters`: an object of meter names to whole quantities.
    private mutating func readMeters(_ reader: inout JSONReader, _ violations: inout [FieldViolation]) throws(JSONSyntaxError) {
        let kind = try reader.peekKind()
        guard kind == .object else {
            try reader.skipValue()
            violations.append(FieldViolation("data.meters", "must be an object of meter names to integers, found \(kind.name)"))
            return
        }
        sawMeters = true
        var count = 0
        meters.reserveCapacity(3)
        try reader.readObject { (reader: inout JSONReader, name: String) throws(JSONSyntaxError) in
            count += 1
            let path = { "data.meters." + name }
            if meters[name] != nil { throw reader.error("duplicate key \"\(name)\"") }
            let quantity = try readTokens(&reader, path(), &violations)
            guard MeterDefinition.isValidName(name) else {
                violations.append(FieldViolation(path(), "is not a meter name: lower-case letters, digits and _, starting with a letter, at most 64"))
                return
            }
            if let quantity { meters[name] = quantity }
        }
        if count > EventLimits.maxMeters {
            violations.append(FieldViolation("data.meters", "must have at most \(EventLimits.maxMeters) entries"))
        }
    }

    var sawMeters = false

    func finish(_ violations: inout [FieldViolation]) {
        guard isObject else { return }
        let tokenFields = inputTokens != nil || outputTokens != nil || cacheRead != nil || cacheWrite != nil || cacheWrite1h != nil || reasoning != nil
        // Either a model call (model and both token counts) or a meter-only event (meters, no
        // model, no token field): schema v1's `oneOf`.
        let meterOnly = model == nil && !tokenFields && sawMeters
        if meterOnly {
            if meters.isEmpty && !violations.contains(where: { $0.path.hasPrefix("data.meters") }) {
                violations.append(FieldViolation("data.meters", "must name at least one meter in an event without a model"))
            }
        } else if model == nil || inputTokens == nil || outputTokens == nil {
            requireFields(&violations)
        }
        if let inputTokens, (cacheRead ?? 0) + (cacheWrite ?? 0) > inputTokens {
            violations.append(FieldViolation("data.cache_read_input_tokens",
                "cache_read_input_tokens + cache_write_input_tokens must not exceed input_tokens (input includes cached tokens)"))
        }
        if let cacheWrite1h, cacheWrite1h > (cacheWrite ?? 0) {
            violations.append(FieldViolation("data.cache_write_1h_input_tokens",
                "must not exceed cache_write_input_tokens (the 1-hour writes are part of the cache writes)"))
        }
        if let outputTokens, let reasoning, reasoning > outputTokens {
            violations.append(FieldViolation("data.reasoning_output_tokens",
                "must not exceed output_tokens (output includes reasoning tokens)"))
        }
    }

    private func requireFields(_ violations: inout [FieldViolation]) {
        for (name, present) in [("model", model != nil), ("input_tokens", inputTokens != nil), ("output_tokens", outputTokens != nil)] where !present {
            let path = "data." + name
            if !violations.contains(where: { $0.path == path }) { violations.append(FieldViolation(path, "is required")) }
        }
    }
}

/// The `data` object of a `tally.wallet.grant` event.
private struct GrantDataState {
    var amountNanos: Int64?
    var currency: Currency?
    var priority: Int64?
    var expiresAt: EventTime?
    var source: GrantSource?
    var isObject = false

    mutating func decode(_ reader: inout JSONReader, _ violations: inout [FieldViolation]) throws(JSONSyntaxError) {
        isObject = try readDataObject(&reader, &violations) { (reader: inout JSONReader, field: GrantField?, name: JSONKey, violations: inout [FieldViolation]) throws(JSONSyntaxError) in
            let path = "data." + name.string
            switch field {
            case .amount:
                // A string, so no producer ever routes money through a float.
                guard let text = try readString(&reader, path, length: 1...40, forbidControl: true, violations: &violations) else { return }
                if GrantEvent.isPlainDecimal(text), let nanos = Money.nanos(text), nanos > 0, nanos <= GrantEvent.maxAmountNanos {
                    amountNanos = nanos
                } else {
                    violations.append(FieldViolation(path, "must be a decimal string above 0 and below 1000000000 with at most 9 decimals, e.g. \"25.00\""))
                }
            case .currency:
                guard let text = try readString(&reader, path, length: 1...16, forbidControl: true, violations: &violations) else { return }
                if let code = Currency(text) { currency = code } else { violations.append(FieldViolation(path, "must be an ISO 4217 code such as \"USD\"")) }
            case .priority:
                let kind = try reader.peekKind()
                guard kind == .number, case .value(let value) = try reader.readInteger(), GrantEvent.priorityRange.contains(value) else {
                    if kind != .number { try reader.skipValue() }
                    violations.append(FieldViolation(path, "must be an integer from \(GrantEvent.priorityRange.lowerBound) to \(GrantEvent.priorityRange.upperBound)"))
                    return
                }
                priority = value
            case .expiresAt:
                guard let text = try readString(&reader, path, length: 1...64, forbidControl: true, violations: &violations) else { return }
                if let time = EventTime(text) { expiresAt = time } else { violations.append(FieldViolation(path, "must be an RFC 3339 date-time with offset")) }
            case .source:
                guard let text = try readString(&reader, path, length: 1...32, forbidControl: true, violations: &violations) else { return }
                if let value = GrantSource(rawValue: text) {
                    source = value
                } else {
                    violations.append(FieldViolation(path, "must be one of \(GrantSource.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", "))"))
                }
            case nil:
                try reader.skipValue()
                violations.append(FieldViolation(path, "is not a field of tally.wallet.grant data"))
            }
        }
    }

    func finish(_ violations: inout [FieldViolation], eventTime: EventTime?) {
        guard isObject else { return }
        for (name, present) in [("amount", amountNanos != nil), ("currency", currency != nil), ("source", source != nil)] where !present {
            let path = "data." + name
            if !violations.contains(where: { $0.path == path }) { violations.append(FieldViolation(path, "is required")) }
        }
        if let expiresAt, let eventTime, expiresAt <= eventTime {
            violations.append(FieldViolation("data.expires_at", "must be after the event time"))
        }
    }
}

/// The `data` object of a `tally.wallet.grant.void` event.
private struct GrantVoidDataState {
    var grantID: String?
    var reason: String?
    var isObject = false

    mutating func decode(_ reader: inout JSONReader, _ violations: inout [FieldViolation]) throws(JSONSyntaxError) {
        isObject = try readDataObject(&reader, &violations) { (reader: inout JSONReader, field: GrantVoidField?, name: JSONKey, violations: inout [FieldViolation]) throws(JSONSyntaxError) in
            let path = "data." + name.string
            switch field {
            case .grantID: grantID = try readString(&reader, path, length: EventLimits.idLength, forbidControl: true, violations: &violations)
            case .reason: reason = try readString(&reader, path, length: 1...GrantVoidEvent.maxReasonLength, forbidControl: true, violations: &violations)
            case nil:
                try reader.skipValue()
                violations.append(FieldViolation(path, "is not a field of tally.wallet.grant.void data"))
            }
        }
    }

    func finish(_ violations: inout [FieldViolation]) {
        if isObject && grantID == nil && !violations.contains(where: { $0.path == "data.grant_id" }) {
            violations.append(FieldViolation("data.grant_id", "is required: the id of the grant to void"))
        }
    }
}

/// Reads `data` member by member, rejecting duplicate keys; anything but an object is one
/// violation. `member` gets each member's field (nil for a name it does not know) and name.
/// Returns whether it was an object.
private func readDataObject<Field: KnownMember>(
    _ reader: inout JSONReader, _ violations: inout [FieldViolation],
    _ member: (inout JSONReader, Field?, JSONKey, inout [FieldViolation]) throws(JSONSyntaxError) -> Void
) throws(JSONSyntaxError) -> Bool {
    guard try reader.peekKind() == .object else {
        violations.append(FieldViolation("data", "must be an object, found \(try reader.peekKind().name)"))
        try reader.skipValue()
        return false
    }
    // Known fields as bits; names the decoder does not know (each a violation) by name.
    var seenFields: UInt32 = 0
    var seenOthers = KeySet()
    let fields = Field.names
    try reader.readMembers { (reader: inout JSONReader, name: JSONKey) throws(JSONSyntaxError) in
        let known = fields.named(name)
        if let (_, bit) = known {
            guard seenFields & bit == 0 else { throw reader.error("duplicate key \"\(name.string)\"") }
            seenFields |= bit
        } else {
            guard seenOthers.insert(name.string) else { throw reader.error("duplicate key \"\(name.string)\"") }
        }
        try member(&reader, known?.field, name, &violations)
    }
    return true
}

private func readString(_ reader: inout JSONReader, _ path: @autoclosure () -> String, length: ClosedRange<Int>, forbidControl: Bool,
                        violations: inout [FieldViolation]) throws(JSONSyntaxError) -> String? {
    let kind = try reader.peekKind()
    guard kind == .string else {
        try reader.skipValue()
        violations.append(FieldViolation(path(), "must be a string, found \(kind.name)"))
        return nil
    }
    let value = try reader.readString()
    // Count Unicode scalars, as JSON Schema's maxLength does; utf8 count bounds it cheaply first.
    let utf8Count = value.utf8.count
    if utf8Count < length.lowerBound || utf8Count > length.upperBound {
        let count = value.unicodeScalars.count
        if !length.contains(count) {
            violations.append(FieldViolation(path(), length.lowerBound == 0
                ? "must be at most \(length.upperBound) characters"
                : "must be \(length.lowerBound) to \(length.upperBound) characters"))
            return nil
        }
    }
    if forbidControl && reader.lastStringHasControl {
        violations.append(FieldViolation(path(), "must not contain control characters"))
        return nil
    }
    return value
}

func containsControl(_ value: String) -> Bool {
    var value = value
    // Over the contiguous bytes: a tight loop, where the UTF-8 view iterates a byte at a time.
    return value.withUTF8 { $0.contains { $0 < 0x20 || $0 == 0x7f } }
}

private func readTokens(_ reader: inout JSONReader, _ path: @autoclosure () -> String, _ violations: inout [FieldViolation]) throws(JSONSyntaxError) -> Int64? {
    let kind = try reader.peekKind()
    guard kind == .number else {
        try reader.skipValue()
        violations.append(FieldViolation(path(), "must be an integer ≥ 0, found \(kind.name)"))
        return nil
    }
    switch try reader.readInteger() {
    case .value(let value) where value >= 0:
        return value
    case .value, .outOfRange(negative: true):
        violations.append(FieldViolation(path(), "must be an integer ≥ 0, found a negative number"))
    case .fractional:
        violations.append(FieldViolation(path(), "must be an integer ≥ 0, found a fraction"))
    case .outOfRange(negative: false):
        violations.append(FieldViolation(path(), "must be at most \(EventLimits.maxTokens)"))
    }
    return nil
}

/// The member names already seen in one object, for duplicate detection without hashing.
private struct KeySet {
    private var names: [String] = []

    /// False when `key` was seen before. Names compare byte for byte, as JSON texts do (and
    /// without String's Unicode-equivalence path, the costly part for unequal names).
    mutating func insert(_ key: String) -> Bool {
        // One allocation per object rather than one each time the array grows.
        if names.isEmpty { names.reserveCapacity(16) }
        let count = key.utf8.count
        for name in names where name.utf8.count == count && name.utf8.elementsEqual(key.utf8) { return false }
        names.append(key)
        return true
    }
}

/// Members the decoder knows by name.
private protocol KnownMember: RawRepresentable<String>, CaseIterable, Sendable {
    /// Every member's name: `MemberNames()`, made once.
    static var names: MemberNames<Self> { get }
}

/// The names of a set of members, laid out to find one without making a `String` of the name
/// or touching a reference count: every name's bytes in one buffer, and per member plain
/// integers (where its name starts, its length, its bit in a set of the members seen).
private struct MemberNames<Field: KnownMember>: Sendable {
    private let bytes: [UInt8]
    private let entries: [(start: Int, length: Int, field: Field, bit: UInt32)]

    init() {
        var bytes: [UInt8] = []
        var entries: [(start: Int, length: Int, field: Field, bit: UInt32)] = []
        for (index, field) in Field.allCases.enumerated() {
            entries.append((bytes.count, field.rawValue.utf8.count, field, UInt32(1) << index))
            bytes += field.rawValue.utf8
        }
        self.bytes = bytes
        self.entries = entries
    }

    /// The member with this name and its bit, or nil for a name the decoder does not know.
    func named(_ name: JSONKey) -> (field: Field, bit: UInt32)? {
        name.withUTF8 { name in
            bytes.withUnsafeBufferPointer { bytes in
                for entry in entries where entry.length == name.count {
                    var index = 0
                    while index < name.count && bytes[entry.start + index] == name[index] { index += 1 }
                    if index == name.count { return (entry.field, entry.bit) }
                }
                return nil
            }
        }
    }
}

/// The envelope's members.
private enum EnvelopeField: String, KnownMember {
    case specversion, id, source, subject, type, time, data

    static let names = MemberNames<Self>()
}

/// The `llm.usage` data members.
private enum UsageField: String, KnownMember {
    case model, provider, feature, environment, properties, meters
    case inputTokens = "input_tokens", outputTokens = "output_tokens", cacheReadInputTokens = "cache_read_input_tokens",
         cacheWriteInputTokens = "cache_write_input_tokens", cacheWrite1hInputTokens = "cache_write_1h_input_tokens",
         reasoningOutputTokens = "reasoning_output_tokens"

    static let names = MemberNames<Self>()
}

/// The `tally.wallet.grant.void` data members.
private enum GrantVoidField: String, KnownMember {
    case grantID = "grant_id", reason

    static let names = MemberNames<Self>()
}

/// The `tally.wallet.grant` data members.
private enum GrantField: String, KnownMember {
    case amount, currency, priority, source
    case expiresAt = "expires_at"

    static let names = MemberNames<Self>()
}
