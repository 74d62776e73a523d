/// An RFC 3339 timestamp with an explicit offset, kept both as written and as UTC microseconds.
public struct EventTime: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// Microseconds since 1970-01-01T00:00:00Z; digits past the microsecond are truncated.
    public let microseconds: Int64
    /// The text as received.
    public let text: String

    public var description: String { text }

    public static func < (lhs: EventTime, rhs: EventTime) -> Bool { lhs.microseconds < rhs.microseconds }

    /// 0001-01-01T00:00:00Z through 9999-12-31T23:59:59.999999Z: the times four-digit RFC 3339
    /// years write, and the ones PostgreSQL's `timestamptz` and every window around them hold.
    public static let supportedRange: ClosedRange<Int64> = -62_135_596_800_000_000...253_402_300_799_999_999

    public init(microseconds: Int64) {
        self.microseconds = microseconds
        self.text = EventTime.format(microseconds: microseconds)
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`: the RFC 3339 profile JSON Schema's
    /// `date-time` accepts (T and Z in either case, no leap second, year 0001 or later).
    public init?(_ text: String) {
        var text = text
        guard let parsed = text.withUTF8({ EventTime.parse($0) }) else { return nil }
        self.microseconds = parsed
        self.text = text
    }

    private static func parse(_ utf8: UnsafeBufferPointer<UInt8>) -> Int64? {
        guard utf8.count >= 20 else { return nil }
        // JSON Schema's date-time accepts t/z in either case.
        func upper(_ byte: UInt8) -> UInt8 { byte == UInt8(ascii: "t") || byte == UInt8(ascii: "z") ? byte - 0x20 : byte }
        func number(_ range: Range<Int>) -> Int? {
            var value = 0
            for index in range {
                let byte = utf8[index]
                guard byte >= 0x30 && byte <= 0x39 else { return nil }
                value = value * 10 + Int(byte - 0x30)
            }
            return value
        }
        guard utf8[4] == UInt8(ascii: "-"), utf8[7] == UInt8(ascii: "-"), upper(utf8[10]) == UInt8(ascii: "T"),
              utf8[13] == UInt8(ascii: ":"), utf8[16] == UInt8(ascii: ":"),
              let year = number(0..<4), let month = number(5..<7), let day = number(8..<10),
              let hour = number(11..<13), let minute = number(14..<16), let second = number(17..<19),
              year >= 1, (1...12).contains(month), day >= 1, day <= EventTime.daysIn(month: month, year: year),
              hour <= 23, minute <= 59, second <= 59
        else { return nil }
        var index = 19
        var micros = 0
        if utf8[index] == UInt8(ascii: ".") {
            index += 1
            let start = index
            var scale = 100_000
            while index < utf8.count, utf8[index] >= 0x30, utf8[index] <= 0x39 {
                micros += Int(utf8[index] - 0x30) * scale
                scale /= 10
                index += 1
            }
            guard index > start else { return nil }
        }
        guard index < utf8.count else { return nil }
        var offsetMinutes = 0
        if upper(utf8[index]) == UInt8(ascii: "Z") {
            guard index + 1 == utf8.count else { return nil }
        } else {
            guard utf8[index] == UInt8(ascii: "+") || utf8[index] == UInt8(ascii: "-"),
                  index + 6 == utf8.count, utf8[index + 3] == UInt8(ascii: ":"),
                  let offsetHour = number(index + 1..<index + 3), let offsetMinute = number(index + 4..<index + 6),
                  offsetHour <= 23, offsetMinute <= 59
            else { return nil }
            offsetMinutes = (offsetHour * 60 + offsetMinute) * (utf8[index] == UInt8(ascii: "-") ? -1 : 1)
        }
        let days = EventTime.daysFromCivil(year: year, month: month, day: day)
        let seconds = Int64(days) * 86_400 + Int64(hour * 3600 + minute * 60 + second) - Int64(offsetMinutes * 60)
        return seconds * 1_000_000 + Int64(micros)
    }

    static func daysIn(month: Int, year: Int) -> Int {
        switch month {
        case 2: return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    static func daysFromCivil(year: Int, month: Int, day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        return era * 146_097 + dayOfEra - 719_468
    }

    /// The civil date of a day count since 1970-01-01.
    static func civil(fromDays days: Int) -> (year: Int, month: Int, day: Int) {
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        return (yearOfEra + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }

    /// `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`
    public static func format(microseconds: Int64) -> String {
        let seconds = microseconds >= 0 ? microseconds / 1_000_000 : (microseconds - 999_999) / 1_000_000
        let micros = Int(microseconds - seconds * 1_000_000)
        let days = Int(seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400)
        let secondOfDay = Int(seconds - Int64(days) * 86_400)
        let (year, month, day) = civil(fromDays: days)
        func pad(_ value: Int, _ width: Int) -> String {
            let text = String(value)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        var text = "\(pad(year, 4))-\(pad(month, 2))-\(pad(day, 2))T\(pad(secondOfDay / 3600, 2)):\(pad(secondOfDay / 60 % 60, 2)):\(pad(secondOfDay % 60, 2))"
        if micros != 0 { text += "." + pad(micros, 6) }
        return text + "Z"
    }
}
