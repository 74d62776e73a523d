/// The dedup horizon (ARCHITECTURE.md, invariant 2): how late an event may reach the log and
/// still be counted, and so how long its identity must be remembered.
///
/// Lateness is measured on the partition's *log clock*: the greatest record timestamp of the
/// partition up to and including the record (milliseconds since the epoch; the broker's time on a
/// topic with `message.timestamp.type=LogAppendTime`, the producer's otherwise). A running maximum
/// of the records themselves, so the decision depends only on offsets `[0, n)` of the partition —
/// never on wall-clock time, batch boundaries or instances — and a replay decides as the live run
/// did. The maximum, not the record's own timestamp: a producer whose clock runs behind cannot
/// slip an old event past the horizon under a backdated timestamp.
///
/// An event whose `time` lies more than the horizon before the log clock is refused with
/// `past_dedup_horizon` (dead letter, metric, `tally status`): never counted, never dropped
/// silently. Every consumer of a topic decides with the same horizon, recorded per topic in
/// `tally.topic_layouts` (default 35 days, the oldest event the ingest API accepts).
public struct DedupHorizon: Sendable, Equatable, CustomStringConvertible {
    /// The default, in days: the oldest event the ingest API accepts (`IngestBatchParser.maxAgeMicroseconds`).
    public static let defaultDays = 35
    /// The longest horizon: a century, far past any retention, well inside Int64 milliseconds.
    public static let maxDays = 36_500

    public let days: Int

    /// - Precondition: `1...maxDays`.
    public init(days: Int) {
        precondition((1...Self.maxDays).contains(days), "a dedup horizon is 1 to \(Self.maxDays) days")
        self.days = days
    }

    public var microseconds: Int64 { Int64(days) * 86_400_000_000 }

    public var description: String { days == 1 ? "1 day" : "\(days) days" }

    /// The code of a refusal, among `PoisonReason.codes`.
    public static let reasonCode = "past_dedup_horizon"

    /// Why an event with this `time` is not counted on a partition whose log clock reads
    /// `logClockMilliseconds`, or nil when it is counted (also when the log has no timestamps yet).
    public func refusal(eventTime: EventTime, logClockMilliseconds: Int64?) -> PoisonReason? {
        guard let clock = logClockMilliseconds else { return nil }
        // Clocks from Kafka fit Int64 milliseconds; in microseconds they may not (a producer's
        // timestamp can be anything): saturate rather than trap.
        let (clockMicroseconds, overflow) = clock.multipliedReportingOverflow(by: 1000)
        let now = overflow ? (clock > 0 ? Int64.max : Int64.min) : clockMicroseconds
        let (oldest, under) = now.subtractingReportingOverflow(microseconds)
        guard !under, eventTime.microseconds < oldest else { return nil }
        let clockText = EventTime.supportedRange.contains(now) ? EventTime(microseconds: now).text : "\(clock) ms"
        return PoisonReason(code: Self.reasonCode, detail: """
            time \(eventTime.text) is more than \(self) before the partition's log time \(clockText) (the dedup horizon \
            of this topic): an event that reaches the log this late is not counted, as its identity is no longer \
            remembered. Nothing else was affected
            """)
    }

    /// One record of a partition, in offset order: the partition's log clock after it and, for a
    /// usage event (`eventTime`), why it is refused. Records below `fromOffset` (where the
    /// partition stood when the horizon was introduced, migration 0026) neither move the clock
    /// nor are judged: they were counted without a horizon, and a replay must count them alike.
    /// `exempt` records (sent again by `tally pricing rate-unpriced`) move the clock and are not judged.
    @inline(__always)
    public func judge(offset: Int64, fromOffset: Int64, clock: Int64?, recordMilliseconds: Int64?,
                      eventTime: EventTime?, exempt: Bool = false) -> (clock: Int64?, refusal: PoisonReason?) {
        guard offset >= fromOffset else { return (clock, nil) }
        let clock = Self.advance(clock, by: recordMilliseconds)
        guard let eventTime, !exempt else { return (clock, nil) }
        return (clock, refusal(eventTime: eventTime, logClockMilliseconds: clock))
    }

    /// The log clock after a record with timestamp `recordMilliseconds` (nil: the record has none).
    @inline(__always)
    public static func advance(_ clock: Int64?, by recordMilliseconds: Int64?) -> Int64? {
        guard let recordMilliseconds else { return clock }
        guard let clock else { return recordMilliseconds }
        return max(clock, recordMilliseconds)
    }
}
