/// The dedup keys a consumer knows to be stored, with their content fingerprints, so that
/// most batches need no look-up in PostgreSQL.
///
/// Only a hint: a key it lacks may still be stored (written by another instance, or before a
/// restart), and the stored key's unique constraint catches that. What it holds must be true,
/// so entries are added only once their transaction committed (or were read back as stored).
///
/// Keys are held as 128-bit fingerprints (about 40 bytes an entry instead of two strings). Two
/// different keys sharing one would make the newer event a duplicate or a conflict; at 2^-128
/// per pair that is not expected in the life of any deployment, and a conflict is recorded, not
/// silent. Two generations bound the memory: when the newer fills up, the older is dropped.
public struct DedupKeyCache: Sendable {
    public struct Fingerprint: Hashable, Sendable {
        let high: UInt64
        let low: UInt64
    }

    public let generationSize: Int
    private var newer: [Fingerprint: UInt64] = [:]
    private var older: [Fingerprint: UInt64] = [:]

    public init(generationSize: Int = 1_000_000) {
        precondition(generationSize > 0)
        self.generationSize = generationSize
    }

    public var count: Int { newer.count + older.count }

    public subscript(key: DedupKey) -> UInt64? {
        let fingerprint = Self.fingerprint(key)
        return newer[fingerprint] ?? older[fingerprint]
    }

    public mutating func insert(_ key: DedupKey, contentHash: UInt64) {
        insert(Self.fingerprint(key), contentHash: contentHash)
    }

    public mutating func insert(_ fingerprint: Fingerprint, contentHash: UInt64) {
        newer[fingerprint] = contentHash
        if newer.count >= generationSize {
            older = newer
            newer = [:]
            newer.reserveCapacity(generationSize)
        }
    }

    public mutating func removeAll() {
        newer = [:]
        older = [:]
    }

    /// FNV-1a beside Swift's SipHash, whose seed is random per process: nobody can craft ids
    /// that collide in both halves offline, and the cache never leaves the process.
    public static func fingerprint(_ key: DedupKey) -> Fingerprint {
        var fnv = ContentHash.FNV()
        fnv.add(key.customerID)
        fnv.add(key.eventID)
        var sip = Hasher()
        sip.combine(key.customerID)
        sip.combine(key.eventID)
        return Fingerprint(high: fnv.value, low: UInt64(bitPattern: Int64(sip.finalize())))
    }
}
