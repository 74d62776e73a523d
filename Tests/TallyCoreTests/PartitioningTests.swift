import XCTest
@testable import TallyCore

/// Where keys belong, and the two ways a record reaches the topic that Tally used to misread:
/// on another partition than its customer's, and as a CloudEvent in Kafka binary mode.
final class PartitioningTests: XCTestCase {
    /// Kafka's own vectors (`UtilsTest.testMurmur2`), Java `int`s.
    func testMurmur2MatchesKafkasJavaClient() {
        let vectors: [(String, Int32)] = [
            ("21", -973_932_308), ("foobar", -790_332_482), ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829), ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ]
        for (key, java) in vectors {
            XCTAssertEqual(Int32(bitPattern: KeyPartitioner.murmur2(Array(key.utf8))), java, key)
        }
        // toPositive(h) % n: "foobar" → 1357151166 % 4 = 2, "abc" → 479470107 % 4 = 3, "21" → 1173551340 % 4 = 0.
        XCTAssertEqual(KeyPartitioner.murmur2.partition(of: "foobar".utf8, partitions: 4), 2)
        XCTAssertEqual(KeyPartitioner.murmur2.partition(of: "abc".utf8, partitions: 4), 3)
        XCTAssertEqual(KeyPartitioner.murmur2.partition(of: "21".utf8, partitions: 4), 0)
    }

    func testCRC32IsZlibs() {
        // The CRC-32 check value (and Python's zlib.crc32(b"abc") = 0x352441c2 → 891568578 % 4 = 2).
        XCTAssertEqual(KeyPartitioner.crc32(Array("123456789".utf8)), 0xcbf4_3926)
        XCTAssertEqual(KeyPartitioner.crc32.partition(of: "abc".utf8, partitions: 4), 2)
    }

    func testEveryKeyLandsInRange() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2_000 {
            let key = (0..<Int.random(in: 0...40, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let partitions = Int32.random(in: 1...Int32.max, using: &generator)
            for partitioner in KeyPartitioner.allCases {
                XCTAssert((0..<partitions).contains(partitioner.partition(of: key, partitions: partitions)))
            }
        }
    }

    func testARecordOnAnotherPartitionThanItsCustomersIsSetAside() {
        let event = EventEncoder.encode(UsageEvent(id: "e", source: "s", subject: "abc", time: EventTime("2026-01-01T00:00:00Z")!, model: "m",
                                                   inputTokens: 1, outputTokens: 1))
        let key: [UInt8]?? = .some(Array("abc".utf8))
        guard case .event = ClassifiedRecord.classify(event, key: key, placement: RecordPlacement(partition: 3, partitions: 4, partitioner: .murmur2))
        else { return XCTFail("abc belongs on partition 3 of 4") }
        // Where librdkafka's old CRC32 default put it.
        guard case .poison(let reason) = ClassifiedRecord.classify(event, key: key, placement: RecordPlacement(partition: 2, partitions: 4, partitioner: .murmur2))
        else { return XCTFail("set aside") }
        XCTAssertEqual(reason.code, "wrong_partition")
        XCTAssertTrue(reason.detail.contains("customer abc belongs on partition 3 of 4"), reason.detail)
        XCTAssertTrue(reason.detail.contains("partitioner=murmur2_random"), reason.detail)
        // A log written with CRC32 is read with --partitioner crc32.
        guard case .event = ClassifiedRecord.classify(event, key: key, placement: RecordPlacement(partition: 2, partitions: 4, partitioner: .crc32))
        else { return XCTFail() }
    }

    func testKafkaBinaryModeIsTheStructuredEventItCarries() throws {
        let data = Array(#"{"model":"gpt-4o","input_tokens":100,"output_tokens":20}"#.utf8)
        let attributes = [("specversion", "1.0"), ("id", "call-1"), ("source", "app://chat"), ("type", "llm.usage"),
                          ("subject", "acme"), ("time", "2026-11-30T10:00:00Z")]
        let binary = BinaryModeEvent.decode(attributes: attributes, contentType: "application/json; charset=utf-8", data: data, binding: .kafka)
        let structured = EventDecoder.decode(#"{"specversion":"1.0","id":"call-1","source":"app://chat","type":"llm.usage","subject":"acme","time":"2026-11-30T10:00:00Z","data":{"model":"gpt-4o","input_tokens":100,"output_tokens":20}}"#)
        XCTAssertEqual(try binary.get(), try structured.get())
        guard case .usage(let usage) = try binary.get() else { return XCTFail() }
        XCTAssertEqual(usage.inputTokens, 100)

        // What a producer gets wrong is named with the mode and the header.
        let missing = BinaryModeEvent.decode(attributes: Array(attributes.dropLast(2)), contentType: nil, data: data, binding: .kafka)
        XCTAssertEqual(missing.failureDescription, "ce_subject: is required (Kafka binary-mode CloudEvent (ce_ headers)); ce_time: is required (Kafka binary-mode CloudEvent (ce_ headers))")
        let text = BinaryModeEvent.decode(attributes: attributes, contentType: "text/plain", data: data, binding: .http)
        XCTAssertTrue(text.failureDescription.contains("content-type: HTTP binary-mode CloudEvent (ce- headers) with data of type text/plain"), text.failureDescription)
        // A value cannot smuggle in attributes of its own.
        let smuggled = BinaryModeEvent.decode(attributes: attributes, contentType: nil, data: Array(#"{"model":"m","input_tokens":1,"output_tokens":1},"subject":"other""#.utf8), binding: .kafka)
        XCTAssertTrue(smuggled.failureDescription.contains("is not one JSON document"), smuggled.failureDescription)
        let twice = BinaryModeEvent.decode(attributes: attributes + [("id", "call-2")], contentType: nil, data: data, binding: .kafka)
        XCTAssertTrue(twice.failureDescription.contains("ce_id: Kafka binary-mode CloudEvent (ce_ headers): the attribute is given twice"), twice.failureDescription)
    }
}

private extension Result where Failure == EventDecodingError {
    var failureDescription: String {
        if case .failure(let error) = self { return error.description }
        return "decoded"
    }
}
