/// Appends JSON text to a byte buffer; strings are escaped per RFC 8259.
public struct JSONWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 512) {
        bytes.reserveCapacity(capacity)
    }

    public mutating func raw(_ text: String) { bytes.append(contentsOf: text.utf8) }
    public mutating func raw(_ json: [UInt8]) { bytes.append(contentsOf: json) }

    public mutating func string(_ value: String) {
        bytes.append(0x22)
        for byte in value.utf8 {
            switch byte {
            case 0x22: bytes.append(contentsOf: [0x5c, 0x22])
            case 0x5c: bytes.append(contentsOf: [0x5c, 0x5c])
            case 0x0a: bytes.append(contentsOf: [0x5c, 0x6e])
            case 0x0d: bytes.append(contentsOf: [0x5c, 0x72])
            case 0x09: bytes.append(contentsOf: [0x5c, 0x74])
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes.append(contentsOf: [0x5c, 0x75, 0x30, 0x30, hex[Int(byte >> 4)], hex[Int(byte & 0xf)]])
            default: bytes.append(byte)
            }
        }
        bytes.append(0x22)
    }

    public mutating func integer(_ value: Int64) { raw(String(value)) }
    public mutating func integer(_ value: Int128) { raw(String(value)) }

    /// Writes `"key":` with a leading comma unless `first`.
    public mutating func key(_ name: String, first: Bool = false) {
        if !first { bytes.append(0x2c) }
        string(name)
        bytes.append(0x3a)
    }
}

/// Writes events as canonical CloudEvents JSON (schema v1).
public enum EventEncoder {
    /// Opens a CloudEvents structured event up to (and including) `"data":`; the caller writes
    /// the data value and the closing brace.
    public static func writeEnvelope(_ json: inout JSONWriter, id: String, source: String, type: String, subject: String, time: String,
                                     extensions: [String: String] = [:]) {
        json.raw("{")
        json.key("specversion", first: true); json.string("1.0")
        json.key("id"); json.string(id)
        json.key("source"); json.string(source)
        json.key("type"); json.string(type)
        json.key("subject"); json.string(subject)
        json.key("time"); json.string(time)
        for (name, rawValue) in extensions.sorted(by: { $0.key < $1.key }) {
            json.key(name); json.raw(rawValue)
        }
        json.key("data")
    }

    public static func encode(_ event: UsageEvent) -> [UInt8] {
        var json = JSONWriter()
        writeEnvelope(&json, id: event.id, source: event.source, type: EventType.usage.rawValue, subject: event.subject,
                      time: event.time.text, extensions: event.extensions)
        json.raw("{")
        // A meter-only event has no model and no token fields (schema v1 allows either form).
        var first = true
        func key(_ name: String) {
            json.key(name, first: first)
            first = false
        }
        if event.isModelCall { key("model"); json.string(event.model) }
        if let provider = event.provider { key("provider"); json.string(provider) }
        if let feature = event.feature { key("feature"); json.string(feature) }
        if let environment = event.environment { key("environment"); json.string(environment) }
        if event.isModelCall {
            key("input_tokens"); json.integer(event.inputTokens)
            key("output_tokens"); json.integer(event.outputTokens)
            key("cache_read_input_tokens"); json.integer(event.cacheReadInputTokens)
            key("cache_write_input_tokens"); json.integer(event.cacheWriteInputTokens)
            // Written only when set, so a v1 event without the split encodes as it always did.
            if event.cacheWrite1hInputTokens != 0 { key("cache_write_1h_input_tokens"); json.integer(event.cacheWrite1hInputTokens) }
            key("reasoning_output_tokens"); json.integer(event.reasoningOutputTokens)
        }
        if !event.meters.isEmpty {
            key("meters"); json.raw("{")
            for (index, (name, quantity)) in event.meters.sorted(by: { $0.key < $1.key }).enumerated() {
                json.key(name, first: index == 0); json.integer(quantity)
            }
            json.raw("}")
        }
        if !event.properties.isEmpty {
            key("properties"); json.raw("{")
            for (index, (name, value)) in event.properties.sorted(by: { $0.key < $1.key }).enumerated() {
                json.key(name, first: index == 0); json.string(value)
            }
            json.raw("}")
        }
        json.raw("}}")
        return json.bytes
    }
}
