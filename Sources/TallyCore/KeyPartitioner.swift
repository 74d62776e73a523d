/// How a record key picks its partition: what Tally's producers use and what its consumers check.
///
/// One customer's records must share one partition (ARCHITECTURE.md, invariant 3). A producer
/// that hashes keys another way puts the customer on a second partition, so the consumers
/// compute where each key belongs and set aside a record found anywhere else (`wrong_partition`).
public enum KeyPartitioner: String, Sendable, CaseIterable {
    /// Kafka's default: `toPositive(murmur2(key)) % partitions`, as the Java client's
    /// `BuiltInPartitioner.partitionForKey`, kafkajs's `DefaultPartitioner` and librdkafka's
    /// `murmur2_random` compute it.
    case murmur2
    /// librdkafka's historical default (`consistent_random`): `crc32(key) % partitions`. Only for a
    /// log written by producers that used it (tally-ingest did, before it switched to murmur2).
    case crc32

    /// The librdkafka `partitioner` property that hashes keys this way.
    public var librdkafkaName: String {
        switch self {
        case .murmur2: "murmur2_random"
        case .crc32: "consistent_random"
        }
    }

    /// The partitioner a librdkafka `partitioner` value names, if Tally can check it.
    public init?(librdkafkaName name: String) {
        switch name {
        case "murmur2", "murmur2_random": self = .murmur2
        case "consistent", "consistent_random": self = .crc32
        default: return nil
        }
    }

    /// The partition, in `0..<partitions`, that `key` belongs to. `partitions` must be positive.
    public func partition(of key: some Collection<UInt8>, partitions: Int32) -> Int32 {
        precondition(partitions > 0, "a topic has at least one partition")
        switch self {
        case .murmur2: return Int32(bitPattern: Self.murmur2(key) & 0x7fff_ffff) % partitions
        case .crc32: return Int32(Self.crc32(key) % UInt32(partitions))
        }
    }

    /// Kafka's murmur2 (seed 0x9747b28c), `org.apache.kafka.common.utils.Utils.murmur2`; the
    /// result as an unsigned bit pattern of Java's `int`.
    public static func murmur2(_ key: some Collection<UInt8>) -> UInt32 {
        let m: UInt32 = 0x5bd1_e995
        var h: UInt32 = 0x9747_b28c ^ UInt32(truncatingIfNeeded: key.count)
        var word: UInt32 = 0
        var filled = 0
        for byte in key {
            word |= UInt32(byte) << (8 * UInt32(filled))
            filled += 1
            guard filled == 4 else { continue }
            var k = word &* m
            k ^= k >> 24
            k = k &* m
            h = (h &* m) ^ k
            word = 0
            filled = 0
        }
        if filled > 0 { h = (h ^ word) &* m }
        h ^= h >> 13
        h = h &* m
        h ^= h >> 15
        return h
    }

    /// CRC-32 (IEEE 802.3, reflected, as zlib's and librdkafka's `rd_crc32`).
    public static func crc32(_ key: some Collection<UInt8>) -> UInt32 {
        var crc: UInt32 = 0xffff_ffff
        for byte in key { crc = crcTable[Int((crc ^ UInt32(byte)) & 0xff)] ^ (crc >> 8) }
        return crc ^ 0xffff_ffff
    }

    private static let crcTable: [UInt32] = (0..<256).map { index in
        var value = UInt32(index)
        for _ in 0..<8 { value = value & 1 == 1 ? 0xedb8_8320 ^ (value >> 1) : value >> 1 }
        return value
    }
}
