// Micro-benchmarks for scripts/bench. Prints figures with their baselines measured in the same run.
import Foundation
import TallyCore

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
    print("decode+validate (one core, \(events.count) distinct events of ~\(averageBytes) bytes):")
    print(String(format: "  tally EventDecoder        %10.0f events/s", tally))
    print(String(format: "  Foundation JSONDecoder    %10.0f events/s   (baseline, decode only)", foundation))
    print(String(format: "  ratio                     %10.1fx", tally / foundation))
}

switch CommandLine.arguments.dropFirst().first {
case "decode": benchDecode()
default:
    print("usage: tally-bench decode")
    exit(2)
}
