/// How an ingest request body holds its events.
public enum IngestBodyFormat: Sendable {
    /// One event object, or a JSON array of them (`application/json`, `application/cloudevents+json`).
    case json
    /// A JSON array of events (`application/cloudevents-batch+json`).
    case batch
    /// One event per line (`application/x-ndjson`).
    case ndjson

    public init?(contentType: String) {
        let media = String(contentType.split(separator: ";").first ?? "").lowercased().filter { $0 != " " && $0 != "\t" }
        switch media {
        case "application/json", "application/cloudevents+json": self = .json
        case "application/cloudevents-batch+json": self = .batch
        case "application/x-ndjson", "application/ndjson": self = .ndjson
        default: return nil
        }
    }
}

/// What happened to one event of a request.
public enum IngestOutcome: Equatable, Sendable {
    /// Valid; to be published (then accepted or not written).
    case valid(UsageEvent, bytes: [UInt8])
    case rejected([FieldViolation])
    /// The same customer and id appeared earlier in this request.
    case duplicateInRequest(firstIndex: Int)
}

/// Why a whole request is refused before looking at its events.
public enum IngestRequestError: Error, Equatable, Sendable {
    case malformed(JSONSyntaxError)
    case tooManyEvents(count: Int, limit: Int)
    case empty
}

/// Splits a request body into events and validates each: schema v1, the accepted
/// event-time window, and duplicates within the request. Pure: no I/O, no clock.
public struct IngestBatchParser: Sendable {
    public var maxEvents: Int
    /// How far event time may lie before `now` (default 35 days) and after it (5 minutes).
    public var maxAgeMicroseconds: Int64
    public var maxFutureMicroseconds: Int64

    public init(maxEvents: Int = 10_000, maxAgeMicroseconds: Int64 = 35 * 86_400_000_000, maxFutureMicroseconds: Int64 = 300_000_000) {
        self.maxEvents = maxEvents
        self.maxAgeMicroseconds = maxAgeMicroseconds
        self.maxFutureMicroseconds = maxFutureMicroseconds
    }

    /// Why `time` lies outside the accepted window around `now`, or nil. Grants and voids sent to
    /// the API keep to it too: an event dated far ahead would move every later record's "now".
    public func timeViolation(_ time: EventTime, nowMicroseconds: Int64, path: String = "time") -> FieldViolation? {
        if time.microseconds < nowMicroseconds - maxAgeMicroseconds {
            return FieldViolation(path, "is more than \(maxAgeMicroseconds / 86_400_000_000) days in the past")
        }
        if time.microseconds > nowMicroseconds + maxFutureMicroseconds {
            return FieldViolation(path, "is more than \(maxFutureMicroseconds / 60_000_000) minutes in the future")
        }
        return nil
    }

    public func parse(_ body: [UInt8], format: IngestBodyFormat, nowMicroseconds: Int64) -> Result<[IngestOutcome], IngestRequestError> {
        let documents: [Result<[UInt8], JSONSyntaxError>]
        switch split(body, format: format) {
        case .failure(let error): return .failure(error)
        case .success(let split): documents = split
        }
        if documents.isEmpty { return .failure(.empty) }
        if documents.count > maxEvents { return .failure(.tooManyEvents(count: documents.count, limit: maxEvents)) }
        var firstIndex: [DedupKey: Int] = [:]
        return .success(documents.enumerated().map { index, document in
            let bytes: [UInt8]
            switch document {
            case .failure(let error): return .rejected([FieldViolation("", error.description)])
            case .success(let value): bytes = value
            }
            if bytes.count > EventLimits.maxEventBytes {
                return .rejected([FieldViolation("", "the event is \(bytes.count) bytes; an event is at most \(EventLimits.maxEventBytes)")])
            }
            switch EventDecoder.decode(bytes) {
            case .failure(let error):
                return .rejected(error.violations)
            case .success(.grant):
                // Credit is granted through its own, separately authorized endpoint.
                return .rejected([FieldViolation("type", "tally.wallet.grant events are posted to /v1/wallets/{customer}/grants")])
            case .success(.grantVoid):
                return .rejected([FieldViolation("type", "tally.wallet.grant.void events are posted to /v1/wallets/{customer}/grants/{grant}/void")])
            case .success(.budget):
                return .rejected([FieldViolation("type", "tally.budget events are put to /v1/customers/{customer}/budgets/{budget}")])
            case .success(.usage(let event)):
                if let violation = timeViolation(event.time, nowMicroseconds: nowMicroseconds) { return .rejected([violation]) }
                let key = DedupKey(customerID: event.subject, source: event.source, eventID: event.id)
                if let first = firstIndex[key] { return .duplicateInRequest(firstIndex: first) }
                firstIndex[key] = index
                return .valid(event, bytes: bytes)
            }
        })
    }

    /// The raw bytes of each event; NDJSON lines that are not JSON fail alone.
    func split(_ body: [UInt8], format: IngestBodyFormat) -> Result<[Result<[UInt8], JSONSyntaxError>], IngestRequestError> {
        if format == .ndjson {
            var documents: [Result<[UInt8], JSONSyntaxError>] = []
            for line in body.split(separator: 0x0a, omittingEmptySubsequences: true) {
                let trimmed = line.last == 0x0d ? line.dropLast() : line
                if trimmed.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
                documents.append(.success(Array(trimmed)))
            }
            return .success(documents)
        }
        return body.withUnsafeBufferPointer { buffer in
            var reader = JSONReader(buffer)
            do throws(JSONSyntaxError) {
                let kind = try reader.peekKind()
                if kind != .array {
                    if format == .batch { throw reader.error("a batch must be a JSON array of events") }
                    let range = try reader.skipValue()
                    try reader.finish()
                    return .success([.success(Array(buffer[range]))])
                }
                try reader.consume(UInt8(ascii: "["))
                var documents: [Result<[UInt8], JSONSyntaxError>] = []
                if !reader.consumeIf(UInt8(ascii: "]")) {
                    repeat {
                        let range = try reader.skipValue()
                        documents.append(.success(Array(buffer[range])))
                    } while reader.consumeIf(UInt8(ascii: ","))
                    try reader.consume(UInt8(ascii: "]"))
                }
                try reader.finish()
                return .success(documents)
            } catch {
                return .failure(.malformed(error))
            }
        }
    }
}
