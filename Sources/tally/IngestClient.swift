import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import TallyCore

/// Sends NDJSON batches to tally-ingest and tallies the per-event answers.
final class IngestClient: @unchecked Sendable {
    struct Summary {
        var accepted = 0
        var rejected = 0
        var duplicates = 0
        var notWritten = 0
        var failedRequests = 0
        var reasons: [String: Int] = [:]

        mutating func add(_ other: Summary) {
            accepted += other.accepted
            rejected += other.rejected
            duplicates += other.duplicates
            notWritten += other.notWritten
            failedRequests += other.failedRequests
            for (reason, count) in other.reasons { reasons[reason, default: 0] += count }
        }
    }

    let url: URL
    let apiKey: String?
    let session: URLSession

    init(baseURL: String, apiKey: String?) throws {
        guard let url = URL(string: baseURL.hasSuffix("/") ? baseURL + "v1/events" : baseURL + "/v1/events") else {
            throw IngestClientError(reason: "bad ingest URL \(baseURL)")
        }
        self.url = url
        self.apiKey = apiKey
        let configuration = URLSessionConfiguration.default
        configuration.httpMaximumConnectionsPerHost = 8
        configuration.timeoutIntervalForRequest = 60
        session = URLSession(configuration: configuration)
    }

    /// Posts one NDJSON batch; a 503 is retried (ids make resending safe) until it lands.
    func send(_ ndjson: [UInt8], events: Int) async -> Summary {
        var request = URLRequest(url: url)
        request.httpMethod = "POST"
        request.setValue("application/x-ndjson", forHTTPHeaderField: "Content-Type")
        if let apiKey { request.setValue("Bearer \(apiKey)", forHTTPHeaderField: "Authorization") }
        request.httpBody = Data(ndjson)
        for attempt in 0..<10 {
            do {
                let (data, response) = try await session.data(for: request)
                let status = (response as? HTTPURLResponse)?.statusCode ?? 0
                if status == 503 && attempt < 9 {
                    try? await Task.sleep(for: .seconds(1))
                    continue
                }
                return Self.summarize(status: status, body: [UInt8](data), events: events)
            } catch {
                if attempt == 9 { return Summary(failedRequests: 1, reasons: ["request failed: \(error.localizedDescription)": events]) }
                try? await Task.sleep(for: .seconds(1))
            }
        }
        return Summary(failedRequests: 1)
    }

    static func summarize(status: Int, body: [UInt8], events: Int) -> Summary {
        // Fast path: the server leads with the counts; a clean batch needs no per-event look.
        if status == 202, let counts = leadingCounts(body), counts.rejected == 0, counts.notWritten == 0 {
            return Summary(accepted: counts.accepted, duplicates: counts.duplicates)
        }
        var summary = Summary()
        guard case .success(let document) = JSONValue.parse(body), case .array(let results)? = document["results"] else {
            summary.failedRequests = 1
            let detail = (try? JSONValue.parse(body).get())?["detail"]?.string ?? String(decoding: body.prefix(200), as: UTF8.self)
            summary.reasons["HTTP \(status): \(detail)", default: 0] += events
            return summary
        }
        for result in results {
            switch result["status"]?.string {
            case "accepted": summary.accepted += 1
            case "duplicate_in_request": summary.duplicates += 1
            case "not_written", "unknown": summary.notWritten += 1
            default:
                summary.rejected += 1
                if case .array(let errors)? = result["errors"] {
                    for error in errors {
                        summary.reasons["\(error["field"]?.string ?? ""): \(error["reason"]?.string ?? "")", default: 0] += 1
                    }
                }
            }
        }
        return summary
    }
}

extension IngestClient {
    /// Reads `{"accepted":A,"rejected":R,"duplicates":D,"not_written":N` from the start of a response.
    static func leadingCounts(_ body: [UInt8]) -> (accepted: Int, rejected: Int, duplicates: Int, notWritten: Int)? {
        let head = String(decoding: body.prefix(120), as: UTF8.self)
        var numbers: [Int] = []
        for name in ["accepted", "rejected", "duplicates", "not_written"] {
            guard let range = head.range(of: "\"\(name)\":") else { return nil }
            numbers.append(Int(head[range.upperBound...].prefix { $0.isNumber }) ?? -1)
        }
        guard numbers.allSatisfy({ $0 >= 0 }) else { return nil }
        return (numbers[0], numbers[1], numbers[2], numbers[3])
    }
}

struct IngestClientError: Error, CustomStringConvertible {
    let reason: String
    var description: String { reason }
}
