import Foundation
import TallyKafka
import XCTest

/// The Kafka wrapper against the real broker.
final class KafkaIntegrationTests: XCTestCase {
    func makeTopic(partitions: Int = 4) throws -> String {
        let topic = TestStack.unique("test.kafka")
        let admin = try KafkaAdmin(configuration: KafkaConfiguration(brokers: try TestStack.brokers), logger: TestStack.logger)
        XCTAssertTrue(try admin.createTopic(topic, partitions: partitions))
        XCTAssertFalse(try admin.createTopic(topic, partitions: partitions), "creating twice reports the existing topic")
        XCTAssertEqual(try admin.partitionCount(of: topic), partitions)
        return topic
    }

    func produce(_ topic: String, count: Int, customers: Int = 10) async throws -> [String: DeliveryReport] {
        let producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: try TestStack.brokers), logger: TestStack.logger)
        let records = (0..<count).map { index in
            ProducerRecord(topic: topic, key: Array("cust-\(index % customers)".utf8), value: Array("value-\(index)".utf8),
                           headers: [KafkaHeader("index", string: "\(index)"), KafkaHeader("empty", nil)])
        }
        let results = await producer.send(records)
        await producer.close()
        var reports: [String: DeliveryReport] = [:]
        for (index, result) in results.enumerated() {
            reports["value-\(index)"] = try result.get()
        }
        return reports
    }

    /// Polls until `count` records arrived or the timeout passes.
    func consume(_ consumer: KafkaConsumer, count: Int, timeout: Duration = .seconds(60)) -> [ConsumerRecord] {
        var records: [ConsumerRecord] = []
        _ = TestStack.eventually(timeout: timeout) {
            records += consumer.poll(maxRecords: 500, timeout: .milliseconds(200))
            return records.count >= count
        }
        return records
    }

    /// Kafka 4's consumer protocol (KIP-848) refuses session.timeout.ms at client creation; a group
    /// member's configuration leaves it out there, and sets it for the classic protocol.
    func testAGroupMemberCanUseTheKIP848ConsumerProtocol() throws {
        let brokers = try TestStack.brokers
        let kip848 = KafkaConfiguration(brokers: brokers, properties: ["group.protocol": "consumer"])
        XCTAssertThrowsError(try KafkaConsumer(configuration: kip848.groupMember(sessionTimeoutMs: 10_000).with("session.timeout.ms", "10000"),
                                               groupID: "g", logger: TestStack.logger), "librdkafka refuses the pair: the test can fail")
        XCTAssertNil(kip848.groupMember(sessionTimeoutMs: 10_000)["session.timeout.ms"])
        let consumer = try KafkaConsumer(configuration: kip848.groupMember(sessionTimeoutMs: 10_000), groupID: "g", logger: TestStack.logger)
        consumer.close()
        XCTAssertEqual(KafkaConfiguration(brokers: brokers).groupMember(sessionTimeoutMs: 7_000)["session.timeout.ms"], "7000")
        XCTAssertEqual(KafkaConfiguration(brokers: brokers, properties: ["session.timeout.ms": "45000"]).groupMember(sessionTimeoutMs: 7_000)["session.timeout.ms"],
                       "45000", "an operator's own value wins")
    }

    func testKeyedRecordsWithHeadersRoundTripThroughAGroup() async throws {
        let topic = try makeTopic()
        let reports = try await produce(topic, count: 200)
        XCTAssertEqual(reports.count, 200)

        var assigned: [TopicPartition] = []
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: try TestStack.brokers),
                                         groupID: TestStack.unique("group"), logger: TestStack.logger) { event in
            if case .assigned(let partitions) = event {
                assigned += partitions
                return Dictionary(uniqueKeysWithValues: partitions.map { ($0, KafkaOffset.beginning) })
            }
            return [:]
        }
        try consumer.subscribe([topic])
        let records = consume(consumer, count: 200)
        consumer.close()

        XCTAssertEqual(Set(assigned.map(\.partition)), [0, 1, 2, 3])
        XCTAssertEqual(records.count, 200)
        var partitionOfKey: [String: Int32] = [:]
        for record in records {
            let value = String(decoding: record.value ?? [], as: UTF8.self)
            let index = Int(value.dropFirst("value-".count))!
            let key = String(decoding: record.key ?? [], as: UTF8.self)
            XCTAssertEqual(key, "cust-\(index % 10)")
            XCTAssertEqual(record.header("index").map { String(decoding: $0, as: UTF8.self) }, "\(index)")
            XCTAssertTrue(record.headers.contains(KafkaHeader("empty", nil)), "null header value survives")
            XCTAssertEqual(record.partition, reports[value]?.partition, "consumed where the delivery report said")
            XCTAssertEqual(record.offset, reports[value]?.offset)
            if let previous = partitionOfKey[key] { XCTAssertEqual(previous, record.partition, "one key, one partition") }
            partitionOfKey[key] = record.partition
        }
        XCTAssertEqual(Set(records.map { String(decoding: $0.value!, as: UTF8.self) }).count, 200, "no record twice")
    }

    func testRebalanceWithTwoConsumersReportsAssignedAndRevokedPartitions() throws {
        let topic = try makeTopic()
        let group = TestStack.unique("group")
        final class Member: @unchecked Sendable {
            let lock = NSLock()
            var owned = Set<Int32>()
            var events: [RebalanceEvent] = []
            var consumer: KafkaConsumer!
            var stop = false
            let done = DispatchSemaphore(value: 0)

            func start(brokers: String, group: String, topic: String) throws {
                consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: brokers, properties: ["session.timeout.ms": "6000"]),
                                             groupID: group, logger: TestStack.logger) { [unowned self] event in
                    lock.withLock {
                        events.append(event)
                        switch event {
                        case .assigned(let partitions): partitions.forEach { owned.insert($0.partition) }
                        case .revoked(let partitions, _): partitions.forEach { owned.remove($0.partition) }
                        }
                    }
                    return [:]
                }
                try consumer.subscribe([topic])
                Thread.detachNewThread { [self] in
                    while !lock.withLock({ stop }) { _ = consumer.poll(maxRecords: 100, timeout: .milliseconds(100)) }
                    consumer.close()
                    done.signal()
                }
            }

            func shutdown() {
                lock.withLock { stop = true }
                done.wait()
            }

            var snapshot: (Set<Int32>, [RebalanceEvent]) { lock.withLock { (owned, events) } }
        }

        let first = Member()
        try first.start(brokers: TestStack.brokers, group: group, topic: topic)
        XCTAssertTrue(TestStack.eventually { first.snapshot.0 == [0, 1, 2, 3] }, "the only member owns every partition")

        let second = Member()
        try second.start(brokers: TestStack.brokers, group: group, topic: topic)
        XCTAssertTrue(TestStack.eventually {
            let (a, b) = (first.snapshot.0, second.snapshot.0)
            return !a.isEmpty && !b.isEmpty && a.isDisjoint(with: b) && a.union(b) == [0, 1, 2, 3]
        }, "two members split the partitions: \(first.snapshot.0) / \(second.snapshot.0)")
        XCTAssertTrue(first.snapshot.1.contains { if case .revoked = $0 { return true } else { return false } },
                      "the first member was told what it gave up")

        second.shutdown()
        XCTAssertTrue(second.snapshot.1.contains { if case .revoked(_, lost: false) = $0 { return true } else { return false } },
                      "leaving revokes cleanly")
        XCTAssertTrue(TestStack.eventually { first.snapshot.0 == [0, 1, 2, 3] }, "the remaining member takes everything back")
        first.shutdown()
    }

    func testSeekToZeroRereadsEverythingAndWatermarksAreTracked() async throws {
        let topic = try makeTopic(partitions: 1)
        _ = try await produce(topic, count: 50)
        let partition = TopicPartition(topic, 0)
        let group = TestStack.unique("group")
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(brokers: try TestStack.brokers), groupID: group, logger: TestStack.logger)
        try consumer.assign([partition: KafkaOffset.beginning])
        let first = consume(consumer, count: 50)
        XCTAssertEqual(first.map(\.offset), Array(0..<50))
        // The fetch-carried high watermark is the true log end (Tansu's queried one is not).
        XCTAssertEqual(consumer.cachedWatermarks(partition)?.high, 50)

        try consumer.seek([partition: 0])
        let again = consume(consumer, count: 50)
        XCTAssertEqual(again.map(\.offset), Array(0..<50), "seek to 0 re-reads everything in order")
        XCTAssertEqual(again.map(\.value), first.map(\.value))

        consumer.commitForMonitoring([partition: 50])
        XCTAssertTrue(try TestStack.eventually(timeout: .seconds(20)) {
            (try consumer.committedOffsets([partition])[partition] ?? nil) == 50
        }, "monitoring commit is visible to the group")
        XCTAssertEqual(try consumer.assignment(), [partition])
        consumer.close()
    }
}

private extension KafkaConfiguration {
    func with(_ key: String, _ value: String) -> KafkaConfiguration {
        var copy = self
        copy[key] = value
        return copy
    }
}
