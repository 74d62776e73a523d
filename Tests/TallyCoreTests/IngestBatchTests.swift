import TallyCore
import XCTest

final class IngestBatchTests: XCTestCase {
    let now: Int64 = 1_800_000_000_000_000
    let parser = IngestBatchParser(maxEvents: 3)

    func event(_ id: String, offsetMinutes: Int64 = 0) -> String {
        let time = EventTime(microseconds: now + offsetMinutes * 60_000_000).text
        return #"{"specversion":"1.0","id":"\#(id)","source":"s","type":"llm.usage","subject":"c","time":"\#(time)","data":{"model":"m","input_tokens":1,"output_tokens":1}}"#
    }

    func parse(_ body: String, _ format: IngestBodyFormat) -> Result<[IngestOutcome], IngestRequestError> {
        parser.parse(Array(body.utf8), format: format, nowMicroseconds: now)
    }

    func statuses(_ result: Result<[IngestOutcome], IngestRequestError>) -> [String] {
        guard case .success(let outcomes) = result else { return ["failure"] }
        return outcomes.map {
            switch $0 {
            case .valid: "valid"
            case .rejected(let violations): "rejected:" + violations.map(\.path).joined(separator: ",")
            case .duplicateInRequest(let first): "duplicate:\(first)"
            }
        }
    }

    func testFormatsAndPerEventOutcomes() {
        XCTAssertEqual(statuses(parse(event("a"), .json)), ["valid"])
        XCTAssertEqual(statuses(parse("[" + event("a") + "," + event("a") + ",{}]", .json)), ["valid", "duplicate:0", "rejected:specversion,id,source,type,subject,time,data"])
        XCTAssertEqual(statuses(parse(event("a") + "\n\n{bad\r\n" + event("b") + "\n", .ndjson)), ["valid", "rejected:", "valid"])
        XCTAssertEqual(IngestBodyFormat(contentType: "application/cloudevents-batch+json; charset=utf-8"), .batch)
        XCTAssertNil(IngestBodyFormat(contentType: "text/plain"))
        if case .failure(.malformed) = parse(event("a"), .batch) {} else { XCTFail("a batch must be an array") }
    }

    /// Issue #20: id 1 from two sources in one request is two events, not duplicate_in_request.
    func testTheSameIdFromAnotherSourceIsAnotherEvent() {
        let other = event("a").replacingOccurrences(of: #""source":"s""#, with: #""source":"app://search""#)
        XCTAssertEqual(statuses(parse("[" + event("a") + "," + other + "," + other + "]", .json)), ["valid", "valid", "duplicate:1"])
    }

    /// Issue #21: what the API accepts the consumers count. An event past the consumers' limit
    /// (an extension attribute of 1 MB) is refused here, with its size, instead of being accepted
    /// and then set aside.
    func testAnEventTheConsumersWouldSetAsideIsRefused() {
        let big = event("big").replacingOccurrences(of: #""specversion":"1.0","#,
                                                    with: #""specversion":"1.0","note":""# + String(repeating: "x", count: EventLimits.maxEventBytes) + #"","#)
        let parser = IngestBatchParser(maxEvents: 3)
        guard case .success(let outcomes) = parser.parse(Array(big.utf8), format: .json, nowMicroseconds: now),
              case .rejected(let violations) = outcomes.first else { return XCTFail("refused") }
        XCTAssertTrue(violations.first?.reason.contains("an event is at most \(EventLimits.maxEventBytes)") ?? false, "\(violations)")
        guard case .event = ClassifiedRecord.classify(Array(event("fits").utf8)) else { return XCTFail() }
    }

    func testEventTimeWindow() {
        XCTAssertEqual(statuses(parse(event("old", offsetMinutes: -35 * 24 * 60 - 1), .json)), ["rejected:time"])
        XCTAssertEqual(statuses(parse(event("ok", offsetMinutes: -35 * 24 * 60 + 1), .json)), ["valid"])
        XCTAssertEqual(statuses(parse(event("future", offsetMinutes: 6), .json)), ["rejected:time"])
        XCTAssertEqual(statuses(parse(event("soon", offsetMinutes: 4), .json)), ["valid"])
    }

    func testRequestLevelErrors() {
        XCTAssertEqual(parse("[" + [event("a"), event("b"), event("c"), event("d")].joined(separator: ",") + "]", .json),
                       .failure(.tooManyEvents(count: 4, limit: 3)))
        XCTAssertEqual(parse("[]", .json), .failure(.empty))
        guard case .failure(.malformed(let error)) = parse("[" + event("a") + ",", .json) else { return XCTFail() }
        XCTAssertEqual(error.offset, event("a").utf8.count + 2)
    }
}
