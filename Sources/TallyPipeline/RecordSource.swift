import TallyKafka
import TallyPostgres

/// Where a consumer loop's records come from: a Kafka consumer in a consumer group
/// (`KafkaConsumer`), or an in-memory twin in tests (`TallyTesting.ScriptedRecordSource`).
///
/// The loop calls every method from its own thread; `onRebalance` runs inside `poll`
/// (and `close`), on that thread, and answers the offset each assigned partition starts at.
public protocol RecordSource: AnyObject {
    /// Joins the group for `topics`; assignments and revocations arrive through `onRebalance` during `poll`.
    func subscribe(_ topics: [String], onRebalance: @escaping (RebalanceEvent) -> [TopicPartition: Int64]) throws(KafkaError)
    /// Up to `maxRecords` records, waiting at most `timeout`; records of one partition in offset order.
    func poll(maxRecords: Int, timeout: Duration) -> [ConsumerRecord]
    /// Moves the fetch positions of assigned partitions.
    func seek(_ offsets: [TopicPartition: Int64], timeout: Duration) throws(KafkaError)
    /// The topic's partition count, from the broker's metadata.
    func partitionCount(of topic: String, timeout: Duration) throws(KafkaError) -> Int
    /// The watermarks the last fetch reported, without a round trip; nil before any fetch.
    func cachedWatermarks(_ partition: TopicPartition) -> Watermarks?
    /// Publishes positions to the group for lag tools; never read back.
    func commitForMonitoring(_ offsets: [TopicPartition: Int64])
    /// Leaves the group (revocations run through `onRebalance`).
    func close()
}

extension RecordSource {
    func seek(_ offsets: [TopicPartition: Int64]) throws(KafkaError) { try seek(offsets, timeout: .seconds(10)) }
    func partitionCount(of topic: String) throws(KafkaError) -> Int { try partitionCount(of: topic, timeout: .seconds(10)) }
}

extension KafkaConsumer: RecordSource {}

/// Where a consumer loop publishes poison records before their offsets move: the dead-letter
/// topic (`BlockingProducer`), or a list in tests.
public protocol DeadLetterSink: AnyObject {
    /// Sends until every record is acknowledged; false when `shouldStop` turned true first.
    func sendAll(_ records: [ProducerRecord], what: String, shouldStop: () -> Bool) -> Bool
}

extension BlockingProducer: DeadLetterSink {}

/// A store failure worth retrying (the database restarting, a lost connection, a deadlock):
/// the loop retries the claim or the batch instead of stopping. Other errors stop the loop.
public protocol RetryableFailure: Error {
    var isRetryable: Bool { get }
}

extension PostgresError: RetryableFailure {}
