@testable import TallyCore
import XCTest

final class EventDecoderTests: XCTestCase {
    let minimal = #"{"specversion":"1.0","id":"e1","source":"app","type":"llm.usage","subject":"c1","time":"2026-03-01T12:00:00Z","data":{"model":"m","input_tokens":10,"output_tokens":5}}"#

    func violations(_ text: String) -> [String] {
        switch EventDecoder.decode(text) {
        case .success: return []
        case .failure(let error): return error.violations.map(\.description)
        }
    }

    func testDecodesEveryField() throws {
        let text = #"{"type":"llm.usage","specversion":"1.0","id":"e1","source":"app","subject":"c1","time":"2026-03-01T13:30:00.5+01:30","traceparent":"00-x","data":{"model":"claude","provider":"anthropic","feature":"chat","environment":"prod","input_tokens":100,"output_tokens":50,"cache_read_input_tokens":60,"cache_write_input_tokens":40,"reasoning_output_tokens":50,"properties":{"team":"a"}}}"#
        guard case .usage(let event) = try EventDecoder.decode(text).get() else { return XCTFail() }
        XCTAssertEqual(event.id, "e1")
        XCTAssertEqual(event.customerID, "c1")
        XCTAssertEqual(event.time.microseconds, EventTime("2026-03-01T12:00:00.5Z")!.microseconds, "offset applied")
        XCTAssertEqual(event.model, "claude")
        XCTAssertEqual(event.provider, "anthropic")
        XCTAssertEqual([event.inputTokens, event.outputTokens, event.cacheReadInputTokens, event.cacheWriteInputTokens, event.reasoningOutputTokens], [100, 50, 60, 40, 50])
        XCTAssertEqual(event.properties, ["team": "a"])
        XCTAssertEqual(event.extensions, ["traceparent": "\"00-x\""], "unknown attributes are kept as raw JSON")
    }

    func testDataBeforeTypeIsDecodedToo() throws {
        let text = #"{"data":{"model":"m","input_tokens":1,"output_tokens":2},"specversion":"1.0","id":"e","source":"s","subject":"c","time":"2026-03-01T12:00:00Z","type":"llm.usage"}"#
        guard case .usage(let event) = try EventDecoder.decode(text).get() else { return XCTFail() }
        XCTAssertEqual(event.outputTokens, 2)
        let invalid = #"{"data":{"model":"m","input_tokens":-1,"output_tokens":2},"specversion":"1.0","id":"e","source":"s","subject":"c","time":"2026-03-01T12:00:00Z","type":"llm.usage"}"#
        XCTAssertEqual(violations(invalid), ["data.input_tokens: must be an integer ≥ 0, found a negative number"])
    }

    func testMessagesNameFieldAndReason() {
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""input_tokens":10"#, with: #""input_tokens":"10""#)),
                       ["data.input_tokens: must be an integer ≥ 0, found a string"])
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""input_tokens":10"#, with: #""input_tokens":1.5"#)),
                       ["data.input_tokens: must be an integer ≥ 0, found a fraction"])
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""input_tokens":10"#, with: #""input_tokens":9007199254740992"#)),
                       ["data.input_tokens: must be at most 9007199254740991"])
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""subject":"c1","#, with: "")), ["subject: is required"])
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: "llm.usage", with: "llm.other")),
                       [#"type: unknown event type; expected one of "llm.usage", "tally.wallet.grant", "tally.wallet.grant.void", "tally.budget""#])
        XCTAssertEqual(violations("{\"a\":1,}"), ["malformed JSON at byte 7: expected a string key"])
        XCTAssertEqual(violations("[]"), ["an event must be a JSON object"])
        // Several problems are all reported at once.
        let many = minimal.replacingOccurrences(of: #""id":"e1""#, with: #""id":"""#).replacingOccurrences(of: #""model":"m""#, with: #""model":7"#)
        XCTAssertEqual(violations(many), ["id: must be 1 to 128 characters", "data.model: must be a string, found a number"])
    }

    func testDuplicateNamesAreMalformedInEveryObject() {
        func isDuplicate(_ text: String) -> Bool {
            violations(text).first?.contains("duplicate key") == true
        }
        let full = minimal.replacingOccurrences(of: #""output_tokens":5"#, with: #""output_tokens":5,"cache_read_input_tokens":1,"reasoning_output_tokens":1,"properties":{"a":"1","b":"2"}"#)
        XCTAssertEqual(violations(full), [], "names of equal length are different names")
        XCTAssertTrue(isDuplicate(minimal.replacingOccurrences(of: #""source":"app""#, with: #""source":"app","source":"app""#)))
        XCTAssertTrue(isDuplicate(minimal.replacingOccurrences(of: #""time":"#, with: #""x":1,"x":2,"time":"#)), "unknown attributes too")
        XCTAssertTrue(isDuplicate(full.replacingOccurrences(of: #""model":"m""#, with: #""model":"m","model":"n""#)))
        XCTAssertTrue(isDuplicate(full.replacingOccurrences(of: #""reasoning_output_tokens":1"#, with: #""reasoning_output_tokens":1,"reasoning_output_tokens":1"#)))
        XCTAssertTrue(isDuplicate(full.replacingOccurrences(of: #""data":{"#, with: #""data":{"zz":1,"zz":1,"#)), "unknown data members too")
        XCTAssertTrue(isDuplicate(full.replacingOccurrences(of: #""b":"2""#, with: #""b":"2","a":"3""#)))
        // A name written with escapes is the same name: it is a known field, and a duplicate of its plain spelling.
        XCTAssertEqual(violations(full.replacingOccurrences(of: #""model":"m""#, with: #""mod\u0065l":"m""#)), [])
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""id":"e1""#, with: #""\u0069d":"e1""#)), [])
        XCTAssertTrue(isDuplicate(full.replacingOccurrences(of: #""model":"m""#, with: #""model":"m","mod\u0065l":"n""#)))
        XCTAssertTrue(isDuplicate(minimal.replacingOccurrences(of: #""time":"#, with: #""\u0074ime":"2026-03-01T12:00:00Z","time":"#)))
        XCTAssertTrue(isDuplicate(full.replacingOccurrences(of: #""data":{"#, with: #""data":{"z\u00e9":1,"zé":1,"#)), "non-ASCII names too")
        XCTAssertEqual(violations(full.replacingOccurrences(of: #""data":{"#, with: #""data":{"zé":1,"#)), [#"data.zé: is not a field of llm.usage data"#])
    }

    func testLabelsRejectControlCharactersHoweverWritten() {
        let control = "must not contain control characters"
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""id":"e1""#, with: #""id":"e\u0007""#)), ["id: \(control)"], "escaped")
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""model":"m""#, with: "\"model\":\"m\u{7f}\"")), ["data.model: \(control)"], "raw DEL")
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""model":"m""#, with: #""model":"\u007fm""#)), ["data.model: \(control)"], "escaped DEL")
        XCTAssertEqual(violations(minimal.replacingOccurrences(of: #""model":"m""#, with: #""model":"caf\u00e9 \"m\"""#)), [], "other escapes")
        // Property values may hold any text but NUL; their names may not hold control characters.
        let properties = minimal.replacingOccurrences(of: #""output_tokens":5"#, with: #""output_tokens":5,"properties":{"note":"line\nbreak\u007f"}"#)
        XCTAssertEqual(violations(properties), [])
        XCTAssertEqual(violations(properties.replacingOccurrences(of: #""note""#, with: #""no\tte""#)),
                       ["data.properties.no\tte: property names must not contain control characters"])
    }

    func testCachedAndReasoningTokensMustFitInTheirTotals() {
        let cached = minimal.replacingOccurrences(of: #""output_tokens":5"#, with: #""output_tokens":5,"cache_read_input_tokens":6,"cache_write_input_tokens":5"#)
        XCTAssertEqual(violations(cached).first?.hasPrefix("data.cache_read_input_tokens: cache_read_input_tokens + cache_write_input_tokens must not exceed input_tokens"), true)
        let reasoning = minimal.replacingOccurrences(of: #""output_tokens":5"#, with: #""output_tokens":5,"reasoning_output_tokens":6"#)
        XCTAssertEqual(violations(reasoning), ["data.reasoning_output_tokens: must not exceed output_tokens (output includes reasoning tokens)"])
    }

    func testWholeNumbersInAnyNotationAreIntegers() {
        func integer(_ text: String) -> JSONInteger? {
            Array(text.utf8).withUnsafeBufferPointer { buffer in
                var reader = JSONReader(buffer)
                return try? reader.readInteger()
            }
        }
        XCTAssertEqual(integer("0"), .value(0))
        XCTAssertEqual(integer("-0"), .value(0))
        XCTAssertEqual(integer("100.0"), .value(100))
        XCTAssertEqual(integer("1e3"), .value(1000))
        XCTAssertEqual(integer("15E-1"), .fractional)
        XCTAssertEqual(integer("1.50e1"), .value(15))
        XCTAssertEqual(integer("-7"), .value(-7))
        XCTAssertEqual(integer("9007199254740991"), .value(9_007_199_254_740_991))
        XCTAssertEqual(integer("9007199254740992"), .outOfRange(negative: false))
        XCTAssertEqual(integer("1e300"), .outOfRange(negative: false))
        XCTAssertEqual(integer("-1e300"), .outOfRange(negative: true))
        XCTAssertEqual(integer("0.000"), .value(0))
        XCTAssertNil(integer("01"))
        XCTAssertNil(integer("1."))
        XCTAssertNil(integer("-"))
    }

    func testEncoderRoundTrips() throws {
        var generator = LoadGenerator(seed: 3, customers: 5, duplicateRate: 0, startMicroseconds: 1_790_000_000_123_456)
        for index in 0..<500 {
            var event = generator.next().event
            event.properties["quote\"and\\slash"] = "line\nbreak\u{1}🚀"
            event.extensions["ext"] = #"{"a":[1,2]}"#
            if index % 3 == 0 { event.meters = ["web_search_requests": Int64(index), "z_last": EventLimits.maxTokens] }
            if index % 5 == 0 {
                // A meter-only event: no model, no tokens.
                event = UsageEvent(id: event.id, source: event.source, subject: event.subject, time: event.time, model: "",
                                   feature: "retrieval", inputTokens: 0, outputTokens: 0, properties: event.properties,
                                   meters: ["vector_searches": 1], extensions: event.extensions)
            }
            XCTAssertEqual(try EventDecoder.decode(EventEncoder.encode(event)).get(), .usage(event))
        }
    }

    func testMeterOnlyEventsHaveNoModelCall() throws {
        let text = #"{"specversion":"1.0","id":"v1","source":"app://agent","type":"llm.usage","subject":"acme","time":"2026-03-01T12:00:00Z","data":{"meters":{"vector_searches":3},"properties":{"end_user":"u1"}}}"#
        guard case .usage(let event) = try EventDecoder.decode(text).get() else { return XCTFail("not a usage event") }
        XCTAssertFalse(event.isModelCall)
        XCTAssertEqual(event.meters, ["vector_searches": 3])
        XCTAssertEqual([event.inputTokens, event.outputTokens], [0, 0])
        // The same meters beside a model call, and the same event without meters, fingerprint apart.
        var call = event
        call.model = "gpt-4o"
        XCTAssertTrue(call.isModelCall)
        var bare = call
        bare.meters = [:]
        XCTAssertNotEqual(ContentHash.of(call), ContentHash.of(bare))
        XCTAssertNotEqual(ContentHash.of(call), ContentHash.of(event))
    }

    func testEventTimeParsesAndFormatsUTC() {
        XCTAssertEqual(EventTime("1970-01-01T00:00:00Z")?.microseconds, 0)
        XCTAssertEqual(EventTime("1970-01-01T01:00:00+01:00")?.microseconds, 0)
        XCTAssertEqual(EventTime("1969-12-31T23:59:59.999999Z")?.microseconds, -1)
        XCTAssertEqual(EventTime("2024-02-29T12:00:00.1234567Z")?.microseconds, EventTime("2024-02-29T12:00:00.123456Z")?.microseconds,
                       "digits past the microsecond are truncated")
        XCTAssertNil(EventTime("2023-02-29T12:00:00Z"))
        XCTAssertNil(EventTime("2024-02-29T12:00:00"))
        XCTAssertNil(EventTime("2024-02-29T12:00:00+1:00"))
        for micros: Int64 in [0, -1, 1_790_000_000_123_456, 951_782_400_000_000, 4_102_444_800_000_000] {
            XCTAssertEqual(EventTime(EventTime.format(microseconds: micros))?.microseconds, micros)
        }
        XCTAssertEqual(EventTime.format(microseconds: 1_709_208_000_000_000), "2024-02-29T12:00:00Z")
    }

    func testLoadGeneratorIsDeterministicAndMakesDuplicates() {
        func stream(_ seed: UInt64) -> [(UsageEvent, Bool)] {
            var generator = LoadGenerator(seed: seed, customers: 50, duplicateRate: 0.2, startMicroseconds: 0)
            return (0..<2000).map { _ in generator.next() }
        }
        let a = stream(9)
        let b = stream(9)
        XCTAssertEqual(a.map(\.0), b.map(\.0))
        let duplicates = a.filter(\.1)
        XCTAssertGreaterThan(duplicates.count, 300)
        XCTAssertLessThan(duplicates.count, 500)
        XCTAssertEqual(Set(a.filter { !$0.1 }.map(\.0.id)).count, a.count - duplicates.count, "distinct ids for distinct events")
        for (event, _) in a { XCTAssertNoThrow(try EventDecoder.decode(EventEncoder.encode(event)).get()) }
    }
}
