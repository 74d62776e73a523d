// Micro-benchmarks for scripts/bench. Prints figures with their baselines measured in the same run.
import Foundation
import Logging
import TallyCore
import TallyKafka
import TallyPipeline

/// The same event as Foundation Codable types: the baseline decoder.
struct CodableEvent: Decodable {
    struct Data: Decodable {
        let model: String
        let provider: String?
        let feature: String?
        let environment: String?
        let input_tokens: Int64
        let output_tokens: Int64
        let cache_read_input_tokens: Int64?
        let cache_write_input_tokens: Int64?
        let reasoning_output_tokens: Int64?
        let properties: [String: String]?
    }
    let specversion: String
    let id: String
    let source: String
    let type: String
    let subject: String
    let time: String
    let data: Data
}

func measure(_ label: String, seconds minimum: Double, _ body: () -> Int) -> Double {
    var count = 0
    let start = DispatchTime.now().uptimeNanoseconds
    var elapsed = 0.0
    repeat {
        count += body()
        elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    } while elapsed < minimum
    return Double(count) / elapsed
}

func benchDecode() {
    var generator = LoadGenerator(seed: 7, customers: 1000, duplicateRate: 0, startMicroseconds: 1_790_000_000_000_000)
    let events = (0..<20_000).map { _ in EventEncoder.encode(generator.next().event) }
    let datas = events.map { Foundation.Data($0) }
    let averageBytes = events.reduce(0) { $0 + $1.count } / events.count

    let tally = measure("tally", seconds: 3) {
        var valid = 0
        for event in events { if case .success = EventDecoder.decode(event) { valid += 1 } }
        precondition(valid == events.count)
        return events.count
    }
    let decoder = JSONDecoder()
    let foundation = measure("foundation", seconds: 3) {
        var valid = 0
        for data in datas {
            // Decoding alone: no time parsing, no limits; the baseline does less work than Tally.
            if (try? decoder.decode(CodableEvent.self, from: data)) != nil { valid += 1 }
        }
        precondition(valid == datas.count)
        return datas.count
    }
    // The stream of `scripts/bench meters`: the same events with meters and four properties.
    var metered = LoadGenerator(seed: 7, customers: 1000, duplicateRate: 0, startMicroseconds: 1_790_000_000_000_000)
    metered.meters = true
    let meterEvents = (0..<20_000).map { _ in EventEncoder.encode(metered.next().event) }
    let meterBytes = meterEvents.reduce(0) { $0 + $1.count } / meterEvents.count
    // Alternating one-second passes, the median of each: the ratio is what this line is for.
    func decodeAll(_ events: [[UInt8]]) -> Int {
        var valid = 0
        for event in events { if case .success = EventDecoder.decode(event) { valid += 1 } }
        precondition(valid == events.count)
        return events.count
    }
    var plainRates: [Double] = [], meterRates: [Double] = []
    for _ in 0..<5 {
        plainRates.append(measure("tally", seconds: 1) { decodeAll(events) })
        meterRates.append(measure("tally meters", seconds: 1) { decodeAll(meterEvents) })
    }
    let plainMedian = plainRates.sorted()[2], withMeters = meterRates.sorted()[2]
    print("decode+validate (one core, \(events.count) distinct events of ~\(averageBytes) bytes):")
    print(String(format: "  tally EventDecoder        %10.0f events/s", tally))
    print(String(format: "  Foundation JSONDecoder    %10.0f events/s   (baseline, decode only)", foundation))
    print(String(format: "  ratio                     %10.1fx", tally / foundation))
    print(String(format: "  tally, events with meters %10.0f events/s   (~%d bytes; %.2f of the events without, %.0f/s, in alternating passes)",
                 withMeters, meterBytes, withMeters / plainMedian, plainMedian))
}

/// The consumers' floor: the topic read through our librdkafka wrapper from offset zero with no
/// PostgreSQL, polling only, then decoding and validating every record as the consumers do
/// (on two threads), then decoding on one thread. Prints, for each pass, its seconds, the events
/// decoded and the CPU-seconds this process used (every thread, librdkafka's included).
func benchConsume(brokers: String, topic: String, records expected: Int) {
    let kafka = KafkaConfiguration(brokers: brokers)
    let logger = Logger(label: "tally.bench")
    enum Decoding { case none, consumers, oneThread }
    var partitionCount: Int32 = 0
    func openAtTheBeginning() throws(KafkaError) -> KafkaConsumer {
        let consumer = try KafkaConsumer(configuration: kafka, groupID: nil, logger: logger)
        let partitions = try consumer.partitionCount(of: topic)
        partitionCount = Int32(partitions)
        try consumer.assign(Dictionary(uniqueKeysWithValues: (0..<partitions).map { (TopicPartition(topic, Int32($0)), KafkaOffset.beginning) }))
        return consumer
    }
    /// CPU-seconds this process has used so far, user and system, all threads.
    func processCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        func seconds(_ time: timeval) -> Double { Double(time.tv_sec) + Double(time.tv_usec) / 1e6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }
    /// Seconds to read (and decode) every record, how many decoded as events, and CPU-seconds used.
    func pass(_ decoding: Decoding) -> (seconds: Double, events: Int, cpuSeconds: Double) {
        let consumer: KafkaConsumer
        switch Result(catching: openAtTheBeginning) {
        case .success(let opened): consumer = opened
        case .failure(let error):
            print("tally-bench: \(error)")
            exit(1)
        }
        defer { consumer.close() }
        var seen = 0
        var events = 0
        let startCPU = processCPUSeconds()
        let start = DispatchTime.now().uptimeNanoseconds
        while seen < expected {
            let records = consumer.poll(maxRecords: 50_000, timeout: .milliseconds(250))
            if records.isEmpty, DispatchTime.now().uptimeNanoseconds - start > 60_000_000_000 {
                print("tally-bench: the topic ended after \(seen) of \(expected) records")
                exit(1)
            }
            seen += records.count
            switch decoding {
            case .none: break
            case .consumers:
                for case .event in ConsumerLoop.classify(records, partitions: partitionCount, partitioner: .murmur2) { events += 1 }
            case .oneThread:
                for record in records {
                    if case .event = record.classified(partitions: partitionCount, partitioner: .murmur2) { events += 1 }
                }
            }
        }
        return (Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9, events, processCPUSeconds() - startCPU)
    }
    for (label, decoding) in [("poll", Decoding.none), ("decode", .consumers), ("decode-one-thread", .oneThread)] {
        let (seconds, events, cpuSeconds) = pass(decoding)
        print(String(format: "%@ %.3f %d %.2f", label, seconds, events, cpuSeconds))
    }
}

let arguments = Array(CommandLine.arguments.dropFirst())
switch arguments.first {
case "decode": benchDecode()
case "consume" where arguments.count == 4 && Int(arguments[3]) != nil:
    benchConsume(brokers: arguments[1], topic: arguments[2], records: Int(arguments[3])!)
default:
    print("usage: tally-bench decode | tally-bench consume BROKERS TOPIC RECORDS")
    exit(2)
}
