import TallyCore
import XCTest

/// Billing settings changes as the API and the CLI give them: fields given replace, the rest stay;
/// every bad field is named.
final class BillingSettingsTests: XCTestCase {
    func change(_ json: String) -> Result<BillingSettingsChange, InvalidSettings> { BillingSettingsChange.parse(json: Array(json.utf8)) }

    func testFieldsGivenReplaceAndTheRestStay() throws {
        var stored = BillingProfile(customerID: "acme")
        stored.plan = "pro"
        stored.lowBalanceThresholdsNanos = [10_000_000_000]
        stored.overage = .allow(limitNanos: 5_000_000_000)
        let parsed = try change(#"{"currency": "EUR", "billing_anchor_day": 15, "subscription_fee": "49.00", "auto_topup": {"below": "5", "amount": "50.5"}}"#).get()
        let profile = try parsed.applied(to: stored).get()
        XCTAssertEqual(profile.plan, "pro")
        XCTAssertEqual(profile.currency.code, "EUR")
        XCTAssertEqual(profile.anchorDay, 15)
        XCTAssertEqual(profile.subscriptionFeeNanos, 49_000_000_000)
        XCTAssertEqual(profile.lowBalanceThresholdsNanos, [10_000_000_000])
        XCTAssertEqual(profile.overage, .allow(limitNanos: 5_000_000_000))
        XCTAssertEqual(profile.autoTopUp, AutoTopUpRule(belowNanos: 5_000_000_000, amountNanos: 50_500_000_000))
        // null clears; stop drops the limit.
        let cleared = try change(#"{"overage_limit": null, "auto_topup": null, "low_balance_thresholds": []}"#).get().applied(to: profile).get()
        XCTAssertEqual(cleared.overage, .allow(limitNanos: nil))
        XCTAssertNil(cleared.autoTopUp)
        XCTAssertEqual(cleared.lowBalanceThresholdsNanos, [])
        XCTAssertEqual(try change(#"{"overage_policy": "stop"}"#).get().applied(to: profile).get().overage, .stop)
    }

    func testEveryBadFieldIsNamed() throws {
        guard case .failure(let unknown) = change(#"{"plan": 7, "owner": "x", "billing_anchor_day": "1", "auto_topup": {"below": "1"}}"#) else {
            return XCTFail("accepted")
        }
        XCTAssertEqual(Set(unknown.violations.map(\.path)), ["plan", "owner", "billing_anchor_day", "auto_topup"])
        let parsed = try change(#"""
            {"plan": "", "currency": "usd!", "billing_anchor_day": 29, "subscription_fee": "-1", "overage_policy": "maybe",
             "overage_limit": "1e3", "low_balance_thresholds": ["1", "9223372036.854775808"], "auto_topup": {"below": "1", "amount": "0"}}
            """#).get()
        guard case .failure(let invalid) = parsed.applied(to: BillingProfile(customerID: "acme")) else { return XCTFail("applied") }
        XCTAssertEqual(invalid.violations.map(\.path), ["plan", "currency", "billing_anchor_day", "subscription_fee", "overage_limit", "overage_policy",
                                                        "low_balance_thresholds.1", "auto_topup.amount"])
        for body in ["", "[]", "null", "{", String(repeating: "[", count: 10_000)] {
            guard case .failure = change(body) else { return XCTFail("accepted \(body.prefix(20))") }
        }
        // The API's form reports the ill-formed fields and the out-of-range ones together.
        guard case .failure(let both) = BillingSettingsChange.apply(json: Array(#"{"billing_anchor_day": 31, "owner": "x"}"#.utf8), to: BillingProfile(customerID: "a")) else {
            return XCTFail("applied")
        }
        XCTAssertEqual(both.violations.map(\.path), ["owner", "billing_anchor_day"])
        // Amounts go up to what a stored amount holds: Int64.max nano-units, and not one past it.
        XCTAssertEqual(try change(#"{"subscription_fee": "9223372036.854775807"}"#).get().applied(to: BillingProfile(customerID: "a")).get().subscriptionFeeNanos,
                       Int64.max)
        for text in ["9223372036.854775808", "1e3", "+1", "1.", ".5", "1.0000000001", " 1"] {
            guard case .failure(let refused) = try change(#"{"subscription_fee": "\#(text)"}"#).get().applied(to: BillingProfile(customerID: "a")) else {
                return XCTFail("applied \(text)")
            }
            XCTAssertEqual(refused.violations.map(\.path), ["subscription_fee"], text)
        }
        // Whole numbers past any day, in range of Int64 or not, are named.
        for day in ["29", "-1", "9223372036854775807", "99999999999999999999999"] {
            let refused: InvalidSettings? = switch change(#"{"billing_anchor_day": \#(day)}"#) {
            case .failure(let invalid): invalid
            case .success(let parsed): if case .failure(let invalid) = parsed.applied(to: BillingProfile(customerID: "a")) { invalid } else { nil }
            }
            XCTAssertEqual(refused?.violations.map(\.path), ["billing_anchor_day"], day)
        }
    }
}
