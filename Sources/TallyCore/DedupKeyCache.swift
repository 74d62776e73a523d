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
    private var newer = FingerprintTable()
    private var older = FingerprintTable()

    public init(generationSize: Int = 1_000_000) {
        precondition(generationSize > 0)
        self.generationSize = generationSize
    }

    public var count: Int { newer.count + older.count }

    public subscript(key: DedupKey) -> UInt64? { self[Self.fingerprint(key)] }

    public subscript(fingerprint: Fingerprint) -> UInt64? {
        newer[fingerprint] ?? older[fingerprint]
    }

    public mutating func insert(_ key: DedupKey, contentHash: UInt64) {
        insert(Self.fingerprint(key), contentHash: contentHash)
    }

    public mutating func insert(_ fingerprint: Fingerprint, contentHash: UInt64) {
        newer.insert(fingerprint, contentHash: contentHash)
        if newer.count >= generationSize {
            older = newer
            newer = FingerprintTable(minimumCapacity: generationSize)
        }
    }

    public mutating func removeAll() {
        newer = FingerprintTable()
        older = FingerprintTable()
    }

    /// FNV-1a beside Swift's SipHash, whose seed is random per process: nobody can craft ids
    /// that collide in both halves offline, and the cache never leaves the process.
    public static func fingerprint(_ key: DedupKey) -> Fingerprint {
        var fnv = ContentHash.FNV()
        fnv.add(key.customerID)
        fnv.add(key.source)
        fnv.add(key.eventID)
        var sip = Hasher()
        sip.combine(key.customerID)
        sip.combine(key.source)
        sip.combine(key.eventID)
        return Fingerprint(high: fnv.value, low: UInt64(bitPattern: Int64(sip.finalize())))
    }
}

/// Fingerprint → content hash, open addressing with linear probing. A fingerprint's low half is
/// a seeded SipHash already, so it picks the slot directly: no key is hashed again, on look-up
/// or when the table grows.
struct FingerprintTable: Sendable {
    private struct Slot {
        var high: UInt64 = 0
        var low: UInt64 = 0
        var contentHash: UInt64 = 0
        /// (0, 0) marks a free slot; that one fingerprint is held beside the slots.
        var isFree: Bool { high == 0 && low == 0 }
    }

    private var slots: [Slot]
    private var zeroFingerprintHash: UInt64?
    private(set) var count = 0

    init(minimumCapacity: Int = 0) {
        // At most three quarters full, in a power of two of slots.
        var capacity = 16
        while capacity * 3 < minimumCapacity * 4 { capacity *= 2 }
        slots = Array(repeating: Slot(), count: capacity)
    }

    subscript(fingerprint: DedupKeyCache.Fingerprint) -> UInt64? {
        if fingerprint.high == 0 && fingerprint.low == 0 { return zeroFingerprintHash }
        let mask = slots.count - 1
        var index = Int(truncatingIfNeeded: fingerprint.low) & mask
        while !slots[index].isFree {
            if slots[index].low == fingerprint.low && slots[index].high == fingerprint.high { return slots[index].contentHash }
            index = (index + 1) & mask
        }
        return nil
    }

    /// Adds the fingerprint, or replaces its content hash.
    mutating func insert(_ fingerprint: DedupKeyCache.Fingerprint, contentHash: UInt64) {
        if fingerprint.high == 0 && fingerprint.low == 0 {
            if zeroFingerprintHash == nil { count += 1 }
            zeroFingerprintHash = contentHash
            return
        }
        if (count + 1) * 4 > slots.count * 3 { grow() }
        let mask = slots.count - 1
        var index = Int(truncatingIfNeeded: fingerprint.low) & mask
        while !slots[index].isFree {
            if slots[index].low == fingerprint.low && slots[index].high == fingerprint.high {
                slots[index].contentHash = contentHash
                return
            }
            index = (index + 1) & mask
        }
        slots[index] = Slot(high: fingerprint.high, low: fingerprint.low, contentHash: contentHash)
        count += 1
    }

    private mutating func grow() {
        let old = slots
        slots = Array(repeating: Slot(), count: old.count * 2)
        count = zeroFingerprintHash == nil ? 0 : 1
        for slot in old where !slot.isFree {
            insert(DedupKeyCache.Fingerprint(high: slot.high, low: slot.low), contentHash: slot.contentHash)
        }
    }
}
