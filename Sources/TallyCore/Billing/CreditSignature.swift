import Crypto
import Synchronization

/// The secrets that sign and verify credit records: `tally.wallet.grant` and
/// `tally.wallet.grant.void` events. Write access to the usage topic must not be a way to mint
/// credit, so the rater applies a credit record only when it carries a signature made with one
/// of these keys (docs/security.md, "Signed credit").
///
/// The signature is a record header, `tally-credit-signature: v1:<key id>:<hex HMAC-SHA256>`
/// (RFC 2104, FIPS 180-4), over the bytes `tally-credit-v1`, 0x00, the topic's length (4 bytes,
/// big-endian), the topic, the record key's length (4 bytes, big-endian), the record key and the
/// record value. The value holds the event whole (structured mode), customer, id, amount and
/// expiry included, so no part of a grant can be changed without the key, nor the grant copied
/// into another topic; a copy sent again is the same grant and is deduplicated by its id.
///
/// The keyring file has one key per line, `<key id> <secret: 64+ hex digits> sign|verify`, `#`
/// comments. Signers (tally-ingest, `tally grant`) use the one `sign` key; verifiers (the rater,
/// replay) accept every key listed. Rotation: add a new `sign` key, turn the old one to `verify`,
/// restart the rater first; keep a `verify` key for as long as records it signed are in the log,
/// or a replay would refuse credit the live run applied.
public struct CreditKeyring: Sendable {
    public struct Key: Sendable {
        /// 1–64 of `A–Z a–z 0–9 . _ -`.
        public let id: String
        let secret: SymmetricKey
        public let signs: Bool
    }

    public static let headerName = "tally-credit-signature"
    /// Shorter secrets are refused: HMAC-SHA256's strength needs 256 bits of key.
    public static let minimumSecretBytes = 32
    private static let domain = Array("tally-credit-v1".utf8) + [0]

    public let keys: [Key]

    /// The key new credit records are signed with.
    public var signingKey: Key? { keys.first(where: \.signs) }

    public init(keys: [Key]) { self.keys = keys }

    /// Parses a keyring file. Errors name the line and the reason.
    public static func parse(_ text: String) -> Result<CreditKeyring, CreditKeyringError> {
        var keys: [Key] = []
        // Split on every newline (\r\n is one Character in Swift, so not on "\n" alone).
        for (index, raw) in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard !fields.isEmpty else { continue }
            func fail(_ reason: String) -> Result<CreditKeyring, CreditKeyringError> { .failure(CreditKeyringError(line: index + 1, reason: reason)) }
            guard fields.count == 3 else { return fail("expected `<key id> <hex secret> sign|verify`, found \(fields.count) fields") }
            let id = String(fields[0])
            guard isValidKeyID(id) else { return fail("key id must be 1–64 of A–Z a–z 0–9 . _ -") }
            guard !keys.contains(where: { $0.id == id }) else { return fail("key id \(id) is listed twice") }
            guard let secret = Hex.decode(fields[1]) else { return fail("the secret of \(id) must be hex digits") }
            guard secret.count >= minimumSecretBytes else {
                return fail("the secret of \(id) has \(secret.count) bytes; at least \(minimumSecretBytes) (\(minimumSecretBytes * 2) hex digits)")
            }
            let signs: Bool
            switch fields[2] {
            case "sign": signs = true
            case "verify": signs = false
            default: return fail("the use of \(id) must be `sign` or `verify`, not \(fields[2])")
            }
            if signs, let other = keys.first(where: \.signs) { return fail("\(id) and \(other.id) are both `sign`; one key signs, the others verify") }
            keys.append(Key(id: id, secret: SymmetricKey(data: secret), signs: signs))
        }
        guard !keys.isEmpty else { return .failure(CreditKeyringError(line: nil, reason: "lists no key")) }
        return .success(CreditKeyring(keys: keys))
    }

    public static func isValidKeyID(_ id: String) -> Bool {
        (1...64).contains(id.utf8.count) && id.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_")
                || byte == UInt8(ascii: "-")
        }
    }

    /// A keyring line with a new random 256-bit secret (the system's secure generator).
    public static func newKeyLine(id: String, use: String = "sign") -> String {
        let secret = SymmetricKey(size: .bits256).withUnsafeBytes { Hex.encode(Array($0)) }
        return "\(id) \(secret) \(use)"
    }

    /// The header value that signs a record of `topic`, or nil when this keyring has no `sign` key.
    public func signature(topic: String, key: [UInt8], value: [UInt8]) -> [UInt8]? {
        guard let signer = signingKey else { return nil }
        let mac = HMAC<SHA256>.authenticationCode(for: Self.message(topic: topic, key: key, value: value), using: signer.secret)
        return Array("v1:\(signer.id):".utf8) + Array(Hex.encode(Array(mac)).utf8)
    }

    /// Nil when `signature` (the header's value) proves the record was signed with a key of this
    /// keyring; otherwise why not, for the dead letter.
    public func refusal(signature: [UInt8]?, topic: String, key: [UInt8], value: [UInt8]) -> String? {
        guard let signature else {
            return "no \(Self.headerName) header: credit is applied only when signed by tally-ingest or `tally grant` (docs/security.md)"
        }
        let parts = signature.split(separator: UInt8(ascii: ":"), maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0].elementsEqual("v1".utf8) else {
            return "\(Self.headerName) is not of the form v1:<key id>:<hex HMAC-SHA256>"
        }
        let id = String(decoding: parts[1].prefix(64), as: UTF8.self)
        guard let used = keys.first(where: { $0.id.utf8.elementsEqual(parts[1]) }) else {
            return "signed with key id \(id), which this keyring does not hold (it holds \(keys.map(\.id).joined(separator: ", ")))"
        }
        guard let mac = Hex.decode(parts[2]), mac.count == SHA256.byteCount,
              HMAC<SHA256>.isValidAuthenticationCode(mac, authenticating: Self.message(topic: topic, key: key, value: value), using: used.secret) else {
            return "the signature made with key id \(id) does not match the record: it was altered or signed with another secret"
        }
        return nil
    }

    private static func message(topic: String, key: [UInt8], value: [UInt8]) -> [UInt8] {
        func length(_ count: Int) -> [UInt8] {
            let length = UInt32(truncatingIfNeeded: count)
            return [UInt8(length >> 24), UInt8(truncatingIfNeeded: length >> 16), UInt8(truncatingIfNeeded: length >> 8), UInt8(truncatingIfNeeded: length)]
        }
        var bytes = domain
        bytes.reserveCapacity(domain.count + 8 + topic.utf8.count + key.count + value.count)
        bytes += length(topic.utf8.count)
        bytes += topic.utf8
        bytes += length(key.count)
        bytes += key
        bytes += value
        return bytes
    }
}

/// Why a keyring file was refused; `line` is 1-based, nil for the file as a whole.
public struct CreditKeyringError: Error, Equatable, CustomStringConvertible {
    public let line: Int?
    public let reason: String

    public var description: String { line.map { "line \($0): \(reason)" } ?? reason }
}

/// What the rater checks of a credit record: its signature, unless the record predates signing.
///
/// Credit records already consumed when signing began (migration 0015 records, per partition,
/// the first offset after them) were applied unsigned and stay applied, by position, so a replay
/// from offset zero decides exactly as the live run did.
public struct CreditVerifier: Sendable {
    public let keyring: CreditKeyring
    /// Partition → the first offset whose credit records must be signed.
    public let horizon: CreditSigningHorizon

    public init(keyring: CreditKeyring, horizon: CreditSigningHorizon = CreditSigningHorizon()) {
        self.keyring = keyring
        self.horizon = horizon
    }

    /// Nil when the credit record at `partition`/`offset` may be applied; otherwise the dead
    /// letter's reason (code `unsigned_credit`).
    public func refusal(topic: String, partition: Int32, offset: Int64, signature: [UInt8]?, key: [UInt8]?, value: [UInt8]?,
                        binaryMode: Bool) -> PoisonReason? {
        if let horizon = horizon.offset(partition), offset < horizon { return nil }
        let detail: String?
        if binaryMode {
            detail = "credit records must be structured-mode CloudEvents (the signature covers the record value, not ce_ headers)"
        } else {
            detail = keyring.refusal(signature: signature, topic: topic, key: key ?? [], value: value ?? [])
        }
        return detail.map { PoisonReason(code: "unsigned_credit", detail: "\($0). Nothing of it was applied (no credit, void or budget)") }
    }
}

/// Per partition, the first offset whose credit records must be signed: those before it were
/// applied unsigned by a rater that predates signing. Filled from `tally.unsigned_credit_horizon`
/// (the live rater records a partition's row when it first claims it; see `RaterStore`) and read
/// by the consumer thread; a partition without a row requires every credit record signed.
public final class CreditSigningHorizon: Sendable {
    private let offsets: Mutex<[Int32: Int64]>

    public init(_ offsets: [Int32: Int64] = [:]) { self.offsets = Mutex(offsets) }

    public func offset(_ partition: Int32) -> Int64? { offsets.withLock { $0[partition] } }

    public func set(_ partition: Int32, _ offset: Int64) { offsets.withLock { $0[partition] = offset } }
}

/// Lower-case hexadecimal, as keyrings and signatures write bytes.
enum Hex {
    static func encode(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes { out.append(digits[Int(byte >> 4)]); out.append(digits[Int(byte & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode<S: Sequence>(_ text: S) -> [UInt8]? where S.Element == UInt8 {
        var out: [UInt8] = []
        var high: UInt8?
        for byte in text {
            let nibble: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): nibble = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): nibble = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): nibble = byte - UInt8(ascii: "A") + 10
            default: return nil
            }
            if let value = high { out.append(value << 4 | nibble); high = nil } else { high = nibble }
        }
        return high == nil && !out.isEmpty ? out : nil
    }

    static func decode(_ text: Substring) -> [UInt8]? { decode(text.utf8) }
}
