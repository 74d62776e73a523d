import Crypto
import Foundation

/// Signing of webhook messages as the Standard Webhooks specification says
/// (https://www.standardwebhooks.com, "Signature scheme"): three headers,
///
///     webhook-id: msg_…            the message's id, the same on every attempt
///     webhook-timestamp: 1614265330  the attempt's time, Unix seconds
///     webhook-signature: v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>
///
/// where the key is the base64-decoded part of the endpoint's secret `whsec_<base64>`. Receivers
/// verify with any Standard Webhooks library (the tests use the PyPI package `standardwebhooks`)
/// and refuse timestamps more than five minutes off.
public enum StandardWebhook {
    public static let secretPrefix = "whsec_"

    /// A new endpoint secret: `whsec_` and the base64 of 32 random bytes (HMAC-SHA256's key size).
    public static func newSecret() -> String {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
        return secretPrefix + Data(bytes).base64EncodedString()
    }

    /// The key a secret stands for; nil when it is not `whsec_` and base64 of 24 to 64 bytes.
    public static func key(of secret: String) -> SymmetricKey? {
        guard secret.hasPrefix(secretPrefix), let bytes = Data(base64Encoded: String(secret.dropFirst(secretPrefix.count))),
              (24...64).contains(bytes.count) else { return nil }
        return SymmetricKey(data: bytes)
    }

    /// The `webhook-signature` value for one attempt.
    public static func signature(key: SymmetricKey, messageID: String, timestamp: Int64, body: [UInt8]) -> String {
        var signed = Array("\(messageID).\(timestamp).".utf8)
        signed += body
        let mac = HMAC<SHA256>.authenticationCode(for: signed, using: key)
        return "v1," + Data(mac).base64EncodedString()
    }

    /// A message's id: `msg_` and 32 hex digits of SHA-256 over its type, the id of what it
    /// reports (an alert's, an invoice's) and its payload, so the same occurrence is always the
    /// same message however often it is enqueued (a second sender, a replay), while another one
    /// that reuses an id (an alert of a log counted again from offset 0) is a message of its own.
    public static func messageID(type: String, sourceID: String, payload: String) -> String {
        let digest = SHA256.hash(data: Array("\(type)/\(sourceID)/\(payload)".utf8))
        return "msg_" + digest.prefix(16).map { String(format: "%02x", $0) }.joined()
    }
}

/// When a failed delivery is tried again: `first` after the first attempt, doubling after each,
/// at most `longest` apart, `attempts` in all (then the delivery is failed until re-sent). The
/// defaults try for about a day and a half: 5 s, 10 s, … 5.7 h, then every 6 h.
public struct WebhookRetryPolicy: Sendable, Equatable {
    public let first: Duration
    public let longest: Duration
    public let attempts: Int

    public init(first: Duration = .seconds(5), longest: Duration = .seconds(6 * 3600), attempts: Int = 18) {
        self.first = first
        self.longest = longest
        self.attempts = attempts
    }

    /// The wait after attempt number `attempt` (1-based) failed; nil when it was the last.
    public func delay(after attempt: Int) -> Duration? {
        guard attempt < attempts else { return nil }
        var delay = first
        for _ in 1..<max(1, attempt) {
            delay *= 2
            if delay >= longest { return longest }
        }
        return min(delay, longest)
    }
}

/// A webhook endpoint's URL: HTTPS, or HTTP on the loopback interface (development and tests).
public enum WebhookURL {
    /// Why `text` cannot be an endpoint, or nil.
    public static func problem(_ text: String) -> String? {
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), let host = url.host, !host.isEmpty else {
            return "\(text) is not an absolute URL"
        }
        if scheme == "https" { return nil }
        if scheme == "http", ["127.0.0.1", "localhost", "::1", "[::1]"].contains(host.lowercased()) { return nil }
        return "\(text): webhooks go to https:// URLs (http:// only on the loopback interface)"
    }
}
