import TallyCore
import XCTest

/// Issue #21: credit records carry proof that a holder of a credit key issued them.
final class CreditSignatureTests: XCTestCase {
    static let secretA = String(repeating: "0123456789abcdef", count: 4)
    static let secretB = String(repeating: "fedcba9876543210", count: 4)

    func keyring(_ text: String) throws -> CreditKeyring { try CreditKeyring.parse(text).get() }

    let grantValue = Array(#"{"specversion":"1.0","id":"g-1","source":"tally-ingest","type":"tally.wallet.grant","subject":"cust-a","time":"2026-11-30T00:00:00Z","data":{"amount":"25.00","currency":"USD","priority":100,"source":"purchase"}}"#.utf8)

    func testAKeyringFileIsReadWithCommentsAndItsMistakesAreNamedByLine() throws {
        let ring = try keyring("""
            # rotated 2026-11
            k2  \(Self.secretB)  sign   # current
            k1\t\(Self.secretA.uppercased())\tverify

            """)
        XCTAssertEqual(ring.keys.map(\.id), ["k2", "k1"])
        XCTAssertEqual(ring.signingKey?.id, "k2")
        XCTAssertEqual(try keyring("k1 \(Self.secretA) sign\r\nk2 \(Self.secretB) verify\r\n").keys.map(\.id), ["k1", "k2"], "CRLF lines")

        let cases: [(String, String)] = [
            ("", "lists no key"),
            ("# only a comment", "lists no key"),
            ("k1 \(Self.secretA)", "line 1: expected `<key id> <hex secret> sign|verify`, found 2 fields"),
            ("k/1 \(Self.secretA) sign", "line 1: key id must be 1–64"),
            (String(repeating: "k", count: 65) + " \(Self.secretA) sign", "line 1: key id must be 1–64"),
            ("k1 \(Self.secretA) sign\nk1 \(Self.secretB) verify", "line 2: key id k1 is listed twice"),
            ("k1 \(Self.secretA.dropLast())z sign", "line 1: the secret of k1 must be hex digits"),
            ("k1 \(Self.secretA.dropLast()) sign", "line 1: the secret of k1 must be hex digits"),
            ("k1 \(Self.secretA.dropLast(2)) sign", "line 1: the secret of k1 has 31 bytes; at least 32 (64 hex digits)"),
            ("k1 \(Self.secretA) signs", "line 1: the use of k1 must be `sign` or `verify`, not signs"),
            ("k1 \(Self.secretA) sign\n\nk2 \(Self.secretB) sign", "line 3: k2 and k1 are both `sign`"),
        ]
        for (text, expected) in cases {
            switch CreditKeyring.parse(text) {
            case .success: XCTFail("accepted: \(text)")
            case .failure(let error): XCTAssertTrue(error.description.hasPrefix(expected), "\(error) for \(text)")
            }
        }
    }

    func testASignedRecordVerifiesUnderEveryKeyringHoldingItsKey() throws {
        let signer = try keyring("k1 \(Self.secretA) sign")
        let key = Array("cust-a".utf8)
        let header = try XCTUnwrap(signer.signature(topic: "tally.usage", key: key, value: grantValue))
        XCTAssertTrue(String(decoding: header, as: UTF8.self).hasPrefix("v1:k1:"))
        XCTAssertEqual(header.count, "v1:k1:".count + 64)
        XCTAssertNil(signer.refusal(signature: header, topic: "tally.usage", key: key, value: grantValue))
        // After rotation: k1 only verifies; the record it signed is still good.
        let rotated = try keyring("k2 \(Self.secretB) sign\nk1 \(Self.secretA) verify")
        XCTAssertNil(rotated.refusal(signature: header, topic: "tally.usage", key: key, value: grantValue))
        XCTAssertNotEqual(rotated.signature(topic: "tally.usage", key: key, value: grantValue), header, "new records are signed with k2")
        // A keyring without k1 names the key it lacks; a verify-only keyring signs nothing.
        let other = try keyring("k2 \(Self.secretB) verify")
        XCTAssertNil(other.signature(topic: "tally.usage", key: key, value: grantValue))
        XCTAssertEqual(other.refusal(signature: header, topic: "tally.usage", key: key, value: grantValue),
                       "signed with key id k1, which this keyring does not hold (it holds k2)")
        // The same key id with another secret is a forgery.
        let forger = try keyring("k1 \(Self.secretB) sign")
        XCTAssertEqual(signer.refusal(signature: forger.signature(topic: "tally.usage", key: key, value: grantValue), topic: "tally.usage", key: key, value: grantValue),
                       "the signature made with key id k1 does not match the record: it was altered or signed with another secret")
    }

    /// The HMAC covers every byte of the key and value: any one changed, or one moved between
    /// them, and the record is refused.
    func testChangingAnyByteOfTheRecordBreaksTheSignature() throws {
        let ring = try keyring("k1 \(Self.secretA) sign")
        let key = Array("cust-a".utf8)
        let header = try XCTUnwrap(ring.signature(topic: "tally.usage", key: key, value: grantValue))
        var generator = SeededGenerator(seed: 2121)
        for _ in 0..<500 {
            var value = grantValue
            let index = Int.random(in: value.indices, using: &generator)
            value[index] ^= UInt8.random(in: 1...255, using: &generator)
            XCTAssertNotNil(ring.refusal(signature: header, topic: "tally.usage", key: key, value: value), "byte \(index) changed")
        }
        XCTAssertNotNil(ring.refusal(signature: header, topic: "tally.usage", key: Array("cust-b".utf8), value: grantValue), "another customer's key")
        XCTAssertNotNil(ring.refusal(signature: header, topic: "staging.usage", key: key, value: grantValue), "copied into another topic")
        // Moving the boundary between key and value keeps the concatenation but not the length prefix.
        XCTAssertNotNil(ring.refusal(signature: header, topic: "tally.usage", key: Array("cust-a{".utf8), value: Array(grantValue.dropFirst())))
        for malformed in ["", "v2:k1:00", "v1:k1", "v1:k1:zz", "v1:k1:" + String(repeating: "0", count: 63), "k1:" + String(repeating: "0", count: 64)] {
            XCTAssertNotNil(ring.refusal(signature: Array(malformed.utf8), topic: "tally.usage", key: key, value: grantValue), malformed)
        }
        XCTAssertEqual(ring.refusal(signature: nil, topic: "tally.usage", key: key, value: grantValue)?.hasPrefix("no tally-credit-signature header"), true)
    }

    func testCreditBeforeTheRecordedHorizonPredatesSigningAndBinaryModeIsRefused() throws {
        let verifier = CreditVerifier(keyring: try keyring("k1 \(Self.secretA) sign"), horizon: CreditSigningHorizon([2: 100]))
        XCTAssertNil(verifier.refusal(topic: "tally.usage", partition: 2, offset: 99, signature: nil, key: nil, value: grantValue, binaryMode: false))
        let refused = try XCTUnwrap(verifier.refusal(topic: "tally.usage", partition: 2, offset: 100, signature: nil, key: nil, value: grantValue, binaryMode: false))
        XCTAssertEqual(refused.code, "unsigned_credit")
        XCTAssertTrue(refused.detail.hasSuffix("Nothing of it was applied (no credit, void or budget)"), refused.detail)
        XCTAssertNotNil(verifier.refusal(topic: "tally.usage", partition: 1, offset: 0, signature: nil, key: nil, value: grantValue, binaryMode: false), "no horizon on partition 1")
        let key = Array("cust-a".utf8)
        let signature = verifier.keyring.signature(topic: "tally.usage", key: key, value: grantValue)
        XCTAssertNil(verifier.refusal(topic: "tally.usage", partition: 1, offset: 5, signature: signature, key: key, value: grantValue, binaryMode: false))
        XCTAssertEqual(verifier.refusal(topic: "tally.usage", partition: 1, offset: 5, signature: signature, key: key, value: grantValue, binaryMode: true)?.code, "unsigned_credit")
    }

    func testANewKeyLineIsAValidKeyringOfRandomSecrets() throws {
        let first = CreditKeyring.newKeyLine(id: "k1")
        let second = CreditKeyring.newKeyLine(id: "k1")
        XCTAssertNotEqual(first, second)
        let ring = try keyring(first)
        XCTAssertEqual(ring.signingKey?.id, "k1")
        XCTAssertEqual(first.split(separator: " ")[1].count, 64)
        XCTAssertEqual(try keyring(CreditKeyring.newKeyLine(id: "k0", use: "verify")).signingKey == nil, true)
    }
}
