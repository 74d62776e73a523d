import ArgumentParser
import Foundation
import TallyCLI
import TallyCore

/// Where tally-ingest is and how to authenticate.
struct IngestTarget: ParsableArguments {
    @Option(name: .customLong("ingest-url"), help: "tally-ingest base URL. Env: TALLY_INGEST_URL. Default: http://127.0.0.1:8080.")
    var ingestURLFlag: String?
    @Option(name: .customLong("api-key"), help: "API key (tally keys create). Env: TALLY_API_KEY.")
    var apiKeyFlag: String?

    var ingestURL: String { ingestURLFlag ?? environment("TALLY_INGEST_URL") ?? "http://127.0.0.1:8080" }
    var apiKey: String? { apiKeyFlag ?? environment("TALLY_API_KEY") }
}

struct Emit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send NDJSON usage events to tally-ingest in batches, with progress and a final summary.",
        discussion: "Exits 1 if any event was rejected or not written.")

    @Argument(help: "NDJSON file; - or none reads standard input.") var file: String?
    @OptionGroup var target: IngestTarget
    @Option(help: "Events per request.") var batchSize = 1000
    @Option(help: "Requests in flight at once.") var concurrency = 4

    func run() async throws {
        let data = (file ?? "-") == "-" ? FileHandle.standardInput.readDataToEndOfFile() : try Data(contentsOf: URL(fileURLWithPath: file!))
        let lines = [UInt8](data).split(separator: 0x0a, omittingEmptySubsequences: true)
        try await EmitRunner.send(lines, batchSize: batchSize, target: target, concurrency: concurrency)
    }
}

enum EmitRunner {
    /// Sends NDJSON lines in batches, prints the summary, and exits 1 unless every event was accepted.
    static func send<Line: Collection<UInt8>>(_ lines: [Line], batchSize: Int, target: IngestTarget, concurrency: Int,
                                              pacer: Pacer = Pacer(rate: 0)) async throws {
        let client = try IngestClient(baseURL: target.ingestURL, apiKey: target.apiKey)
        let batches = stride(from: 0, to: lines.count, by: batchSize).map { start in
            let slice = lines[start..<min(start + batchSize, lines.count)]
            return (bytes: Array(slice.joined(separator: [0x0a])) + [0x0a], count: slice.count)
        }
        let summary = try await run(batches: batches, total: lines.count, client: client, concurrency: concurrency, pacer: pacer)
        report(summary)
        if summary.rejected + summary.notWritten + summary.failedRequests > 0 { throw ExitCode(1) }
    }

    /// Sends batches with at most `concurrency` in flight, drawing a progress bar on stderr.
    static func run(batches: [(bytes: [UInt8], count: Int)], total: Int, client: IngestClient, concurrency: Int,
                    pacer: Pacer = Pacer(rate: 0)) async throws -> IngestClient.Summary {
        var summary = IngestClient.Summary()
        var pacer = pacer
        var launched = 0
        var sent = 0
        let started = ContinuousClock.now
        try await withThrowingTaskGroup(of: (IngestClient.Summary, Int).self) { group in
            var next = 0
            func launch() async {
                guard next < batches.count else { return }
                let batch = batches[next]
                next += 1
                launched += batch.count
                await pacer.wait(untilSent: launched)
                group.addTask { (await client.send(batch.bytes, events: batch.count), batch.count) }
            }
            for _ in 0..<max(1, concurrency) { await launch() }
            while let (result, count) = try await group.next() {
                summary.add(result)
                sent += count
                progress(sent: sent, total: total, started: started)
                await launch()
            }
        }
        FileHandle.standardError.write(Data("\n".utf8))
        return summary
    }

    static func progress(sent: Int, total: Int, started: ContinuousClock.Instant) {
        let fraction = total == 0 ? 1 : Double(sent) / Double(total)
        let width = 30
        let filled = Int(fraction * Double(width))
        let seconds = max(0.001, (ContinuousClock.now - started).totalSeconds)
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        FileHandle.standardError.write(Data("\r[\(bar)] \(sent)/\(total) events, \(Int(Double(sent) / seconds)) events/s".utf8))
    }

    static func report(_ summary: IngestClient.Summary) {
        print("accepted \(summary.accepted), rejected \(summary.rejected), duplicates in request \(summary.duplicates), not written or unconfirmed \(summary.notWritten), failed requests \(summary.failedRequests)")
        for (reason, count) in summary.reasons.sorted(by: { $0.value > $1.value }).prefix(10) {
            print("  \(count) × \(reason)")
        }
    }
}
