import Crypto
import Foundation
import TallyCore
import XCTest

final class WebhookTests: XCTestCase {
    /// The Standard Webhooks specification's example, also what the `standardwebhooks` PyPI
    /// package's `Webhook.sign` gives for it.
    func testTheSignatureIsTheSpecificationsExample() throws {
        let key = try XCTUnwrap(StandardWebhook.key(of: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"))
        XCTAssertEqual(StandardWebhook.signature(key: key, messageID: "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp: 1_614_265_330,
                                                 body: Array(#"{"test": 2432232314}"#.utf8)),
                       "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        // One byte of the body, the id or the time changed: another signature.
        XCTAssertNotEqual(StandardWebhook.signature(key: key, messageID: "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp: 1_614_265_331,
                                                    body: Array(#"{"test": 2432232314}"#.utf8)),
                          "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
    }

    func testSecrets() throws {
        let secret = StandardWebhook.newSecret()
        XCTAssertTrue(secret.hasPrefix("whsec_"))
        XCTAssertEqual(Data(base64Encoded: String(secret.dropFirst(6)))?.count, 32)
        XCTAssertNotEqual(secret, StandardWebhook.newSecret())
        XCTAssertNotNil(StandardWebhook.key(of: secret))
        for bad in ["", "whsec_", "whsec_not base64!", "sk_" + String(secret.dropFirst(6)), "whsec_" + Data(count: 8).base64EncodedString()] {
            XCTAssertNil(StandardWebhook.key(of: bad), bad)
        }
    }

    /// Stable: SHA-256 of "type/source id/payload", computed for this test with Python's hashlib.
    func testMessageIDsDeriveFromWhatTheyReport() {
        let id = StandardWebhook.messageID(type: "wallet.low_balance", sourceID: "alice/USD/5000000000/0-3-0", payload: "{}")
        XCTAssertEqual(id, "msg_eeae22b329e8f585e19bf6b479359503")
        XCTAssertNotEqual(StandardWebhook.messageID(type: "wallet.topup_requested", sourceID: "alice/USD/5000000000/0-3-0", payload: "{}"), id)
        // An id reused by another occurrence (a log counted again from offset 0): another message.
        XCTAssertNotEqual(StandardWebhook.messageID(type: "wallet.low_balance", sourceID: "alice/USD/5000000000/0-3-0", payload: "{ }"), id)
    }

    func testRetriesDoubleUpToTheLongestAndStopAfterTheLastAttempt() {
        let policy = WebhookRetryPolicy(first: .seconds(5), longest: .seconds(60), attempts: 6)
        XCTAssertEqual((1...6).map { policy.delay(after: $0) }, [.seconds(5), .seconds(10), .seconds(20), .seconds(40), .seconds(60), nil])
        let defaults = WebhookRetryPolicy()
        XCTAssertEqual(defaults.delay(after: 13), .seconds(5 * 4096))
        XCTAssertEqual(defaults.delay(after: 14), .seconds(6 * 3600))
        XCTAssertEqual(defaults.delay(after: 17), .seconds(6 * 3600))
        XCTAssertNil(defaults.delay(after: 18))
        // About a day and a half from the first attempt to the last.
        let total = (1..<18).compactMap { defaults.delay(after: $0) }.reduce(Duration.zero, +)
        XCTAssertEqual(total, .seconds(5 * (8192 - 1) + 4 * 6 * 3600))
        XCTAssertNil(WebhookRetryPolicy(attempts: 1).delay(after: 1))
    }

    func testEndpointURLs() {
        for good in ["https://hooks.example.com/tally", "http://127.0.0.1:8080/x", "http://localhost/x", "http://[::1]:9000/x"] { XCTAssertNil(WebhookURL.problem(good), good) }
        for bad in ["http://hooks.example.com/tally", "ftp://x/y", "hooks.example.com", "", "https://"] { XCTAssertNotNil(WebhookURL.problem(bad), bad) }
    }
}
