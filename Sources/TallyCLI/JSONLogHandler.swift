import Foundation
import Logging

/// Writes one JSON object per log line to stderr: time, level, service, message and metadata.
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    private let service: String

    public init(service: String, level: Logger.Level) {
        self.service = service
        self.logLevel = level
    }

    /// Installs the handler for the whole process.
    public static func bootstrap(service: String, level: String) {
        let parsed = Logger.Level(rawValue: level) ?? .info
        LoggingSystem.bootstrap { _ in JSONLogHandler(service: service, level: parsed) }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var fields: [String: String] = [:]
        for (key, value) in metadata { fields[key] = "\(value)" }
        if let extra = event.metadata { for (key, value) in extra { fields[key] = "\(value)" } }
        var line = "{\"ts\":\"\(Self.timestamp())\",\"level\":\"\(event.level)\",\"service\":\"\(service)\",\"msg\":\(Self.quote("\(event.message)"))"
        for (key, value) in fields.sorted(by: { $0.key < $1.key }) {
            line += ",\(Self.quote(key)):\(Self.quote(value))"
        }
        line += "}\n"
        FileHandle.standardError.write(Data(line.utf8))
    }

    static func timestamp() -> String {
        let now = Date().timeIntervalSince1970
        let micros = Int64(now * 1_000_000)
        return String(EventTimeFormatter.format(micros: micros))
    }

    static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 { out += String(format: "\\u%04x", scalar.value) } else { out.unicodeScalars.append(scalar) }
            }
        }
        return out + "\""
    }
}

/// ISO 8601 UTC timestamps for log lines, millisecond precision.
enum EventTimeFormatter {
    static func format(micros: Int64) -> String {
        let date = Date(timeIntervalSince1970: Double(micros) / 1_000_000)
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: date)
    }
}
