/// CloudEvents binary content mode: the attributes travel as headers (`ce_id` in Kafka, `ce-id`
/// in HTTP) and the record value or request body is the event's `data`.
///
/// Sources: CloudEvents 1.0 Kafka protocol binding §3.2 and HTTP protocol binding §3.1
/// (github.com/cloudevents/spec). The `content-type` header is the `datacontenttype`; Tally's data
/// is JSON, so any other media type is refused with its name.
public enum BinaryModeEvent {
    public enum Binding: Sendable {
        case kafka, http

        /// Header prefix of an attribute: `ce_` (Kafka), `ce-` (HTTP, matched case-insensitively).
        public var prefix: String { self == .kafka ? "ce_" : "ce-" }
        var modeName: String { self == .kafka ? "Kafka binary-mode CloudEvent (ce_ headers)" : "HTTP binary-mode CloudEvent (ce- headers)" }
    }

    /// Attributes that are part of the envelope and must not be sent as `ce_` headers.
    private static let reserved: Set<String> = ["data", "data_base64", "datacontenttype"]

    /// Decodes a binary-mode event as if it had arrived as the equivalent structured document.
    ///
    /// - Parameters:
    ///   - attributes: header name without the prefix (lower case) and value (percent-decoded for HTTP).
    ///   - contentType: the `content-type` header, if any: JSON (`application/json`, `…+json`) or absent.
    ///   - data: the record value or request body, one JSON value.
    /// - Returns: the event, or violations whose paths name headers (`ce_subject`) where an
    ///   attribute is at fault, each saying which mode was read.
    public static func decode(attributes: [(name: String, value: String)], contentType: String?, data: [UInt8],
                              binding: Binding) -> Result<TallyEvent, EventDecodingError> {
        structuredDocument(attributes: attributes, contentType: contentType, data: data, binding: binding).flatMap { document in
            EventDecoder.decode(document).mapError { .invalid(attributed($0.violations, binding: binding)) }
        }
    }

    /// The structured-mode JSON document equivalent to a binary-mode event (not yet validated as
    /// an event), or why the headers and data cannot make one.
    public static func structuredDocument(attributes: [(name: String, value: String)], contentType: String?, data: [UInt8],
                                          binding: Binding) -> Result<[UInt8], EventDecodingError> {
        if let contentType, !isJSON(contentType) {
            return .failure(.invalid([FieldViolation("content-type", "\(binding.modeName) with data of type \(contentType): Tally's event data is JSON (application/json)")]))
        }
        var writer = JSONWriter(capacity: data.count + 256)
        writer.raw("{")
        var names = Set<String>()
        for (name, value) in attributes {
            guard !name.isEmpty, name.utf8.allSatisfy({ (0x61...0x7a).contains($0) || (0x30...0x39).contains($0) }) else {
                return .failure(.invalid([FieldViolation(binding.prefix + name, "\(binding.modeName): an attribute name is lower-case letters and digits")]))
            }
            guard !reserved.contains(name) else {
                return .failure(.invalid([FieldViolation(binding.prefix + name, "\(binding.modeName): \(name) is not sent as an attribute header; the \(binding == .kafka ? "record value" : "request body") is the data")]))
            }
            guard names.insert(name).inserted else {
                return .failure(.invalid([FieldViolation(binding.prefix + name, "\(binding.modeName): the attribute is given twice")]))
            }
            writer.key(name, first: names.count == 1)
            writer.string(value)
        }
        if !data.isEmpty {
            // The value is spliced into the document: it must be exactly one JSON value, or it
            // could add members of its own.
            let oneValue: Bool = data.withUnsafeBufferPointer { buffer in
                var reader = JSONReader(buffer)
                do throws(JSONSyntaxError) {
                    try reader.skipValue()
                    try reader.finish()
                    return true
                } catch {
                    return false
                }
            }
            guard oneValue else {
                return .failure(.invalid([FieldViolation("data", "\(binding.modeName): the \(binding == .kafka ? "record value" : "request body") is not one JSON document")]))
            }
            writer.key("data", first: names.isEmpty)
            writer.raw(data)
        }
        writer.raw("}")
        return .success(writer.bytes)
    }

    /// Violations of the structured document, re-pathed to the headers a producer sent: `subject`
    /// becomes `ce_subject` (or `ce-subject`); `data…` paths stay; each names the mode.
    public static func attributed(_ violations: [FieldViolation], binding: Binding) -> [FieldViolation] {
        violations.map { violation in
            let attribute = violation.path.split(separator: ".", maxSplits: 1).first.map(String.init) ?? ""
            let path = attribute == "data" || attribute.isEmpty ? violation.path : binding.prefix + violation.path
            return FieldViolation(path, "\(violation.reason) (\(binding.modeName))")
        }
    }

    /// True for `application/json`, any `…+json` type and their parameters (`; charset=utf-8`).
    public static func isJSON(_ contentType: String) -> Bool {
        let mediaType = String(contentType.prefix { $0 != ";" }.filter { $0 != " " && $0 != "\t" }).lowercased()
        return mediaType == "application/json" || mediaType.hasSuffix("+json")
    }
}
