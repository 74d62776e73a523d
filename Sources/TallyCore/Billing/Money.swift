/// A decimal number read exactly from text (`"2.50"`, `"3e-06"`, `"-0.1"`): value = significand × 10^exponent.
///
/// Prices and amounts are parsed from decimal strings and never pass through
/// floating point (ARCHITECTURE.md, invariant 5).
public struct ExactDecimal: Hashable, Sendable, CustomStringConvertible {
    public let significand: Int128
    public let exponent: Int

    public init(significand: Int128, exponent: Int) {
        self.significand = significand
        self.exponent = exponent
    }

    /// Parses `[-+]digits[.digits][e[-+]digits]`; nil for anything else (including more than 36 digits).
    public init?(_ text: String) {
        var bytes = Array(text.utf8)[...]
        var negative = false
        if let sign = bytes.first, sign == UInt8(ascii: "-") || sign == UInt8(ascii: "+") {
            negative = sign == UInt8(ascii: "-")
            bytes = bytes.dropFirst()
        }
        var significand: Int128 = 0
        var exponent = 0
        var digits = 0
        var sawDigit = false
        var afterPoint = false
        while let byte = bytes.first {
            if byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") {
                sawDigit = true
                if significand != 0 || byte != UInt8(ascii: "0") { digits += 1 }
                guard digits <= 36 else { return nil }
                significand = significand * 10 + Int128(byte - UInt8(ascii: "0"))
                if afterPoint { exponent -= 1 }
            } else if byte == UInt8(ascii: "."), !afterPoint {
                afterPoint = true
            } else {
                break
            }
            bytes = bytes.dropFirst()
        }
        guard sawDigit else { return nil }
        if let marker = bytes.first, marker == UInt8(ascii: "e") || marker == UInt8(ascii: "E") {
            guard let power = Int(String(decoding: bytes.dropFirst(), as: UTF8.self)), abs(power) <= 60 else { return nil }
            exponent += power
        } else if !bytes.isEmpty {
            return nil
        }
        self.init(significand: negative ? -significand : significand, exponent: exponent)
    }

    /// The value as a whole number of `10^-scale` units; nil when that would drop non-zero
    /// digits or overflow. `scaled(9)` of `"2.5"` is 2,500,000,000.
    public func scaled(_ scale: Int) -> Int128? {
        let shift = exponent + scale
        if shift >= 0 {
            var value = significand
            for _ in 0..<shift {
                let (product, overflow) = value.multipliedReportingOverflow(by: 10)
                if overflow { return nil }
                value = product
            }
            return value
        }
        var value = significand
        for _ in 0..<(-shift) {
            if value % 10 != 0 { return nil }
            value /= 10
        }
        return value
    }

    public var isNegative: Bool { significand < 0 }

    public var description: String { Money.format(significand, scale: -exponent) }
}

/// Money amounts are integers of nano-units (10^-9 of the currency unit): fine enough that
/// per-token charges of the cheapest models are not rounded to zero before they add up.
///
/// Every stored amount (a period's charge for one price item, a grant, a wallet balance, an
/// invoice line or total) is an `Int64` of nano-units, so it lies within ±`maxNanos`
/// (9,223,372,036.854775807 currency units). Arithmetic that could leave that range is checked:
/// the rater keeps a record that would aside with its reason (`tally.unrateable_records`), and
/// nothing traps.
public enum Money {
    public static let nanoScale = 9
    public static let nanosPerUnit: Int64 = 1_000_000_000
    /// The largest amount Tally stores, in nano-units (`Int64.max`).
    public static let maxNanos = Int64.max

    /// `a + b`, or nil when the sum leaves the stored range.
    public static func adding(_ a: Int64, _ b: Int64) -> Int64? {
        let (sum, overflow) = a.addingReportingOverflow(b)
        return overflow ? nil : sum
    }

    /// `a - b`, or nil when the difference leaves the stored range.
    public static func subtracting(_ a: Int64, _ b: Int64) -> Int64? {
        let (difference, overflow) = a.subtractingReportingOverflow(b)
        return overflow ? nil : difference
    }

    /// `a + b`, clamped to the stored range: for estimates and holds, where the safe side of
    /// a bound is enough and an exact figure is not owed to anyone.
    public static func saturatingAdd(_ a: Int64, _ b: Int64) -> Int64 {
        let (sum, overflow) = a.addingReportingOverflow(b)
        return overflow ? (b > 0 ? Int64.max : Int64.min) : sum
    }

    /// An exact wide amount of nano-units as a stored amount, or nil when it does not fit.
    public static func narrow(_ nanos: Int128) -> Int64? { Int64(exactly: nanos) }

    /// Parses a decimal amount ("12.5") into nano-units; nil when finer than a nano-unit or too large.
    public static func nanos(_ text: String) -> Int64? {
        guard let decimal = ExactDecimal(text), let value = decimal.scaled(nanoScale),
              let exact = Int64(exactly: value) else { return nil }
        return exact
    }

    /// Nano-units as a decimal text with trailing zeros trimmed, at least `minimumFractionDigits`.
    public static func format(nanos: Int64, minimumFractionDigits: Int = 2) -> String {
        format(Int128(nanos), scale: nanoScale, minimumFractionDigits: minimumFractionDigits)
    }

    /// Wide nano-units (sums of stored amounts) as decimal text, like `format(nanos:minimumFractionDigits:)`.
    public static func format(nanos: Int128, minimumFractionDigits: Int = 2) -> String {
        format(nanos, scale: nanoScale, minimumFractionDigits: minimumFractionDigits)
    }

    /// A whole number of 10^-scale units with trailing zeros trimmed, at least `minimumFractionDigits`.
    public static func format(_ value: Int128, scale: Int, minimumFractionDigits: Int) -> String {
        padded(trimmed(format(value, scale: scale)), minimumFractionDigits)
    }

    /// A whole number of 10^-scale units as decimal text (`format(250, scale: 2)` = "2.50").
    static func format(_ value: Int128, scale: Int) -> String {
        let negative = value < 0
        var digits = String(negative ? -value : value)
        if scale <= 0 {
            return (negative ? "-" : "") + digits + String(repeating: "0", count: -scale)
        }
        if digits.count <= scale { digits = String(repeating: "0", count: scale - digits.count + 1) + digits }
        let split = digits.index(digits.endIndex, offsetBy: -scale)
        return (negative ? "-" : "") + digits[..<split] + "." + digits[split...]
    }

    private static func trimmed(_ text: String) -> String {
        guard text.contains(".") else { return text }
        var text = Substring(text)
        while text.last == "0" { text = text.dropLast() }
        if text.last == "." { text = text.dropLast() }
        return String(text)
    }

    private static func padded(_ text: String, _ fractionDigits: Int) -> String {
        guard fractionDigits > 0 else { return text }
        let existing = text.firstIndex(of: ".").map { text.distance(from: $0, to: text.endIndex) - 1 } ?? -1
        if existing >= fractionDigits { return text }
        return text + (existing < 0 ? "." : "") + String(repeating: "0", count: fractionDigits - max(existing, 0))
    }

    /// Divides and rounds half away from zero (the rounding Tally uses everywhere money is rounded).
    public static func divideRounded(_ numerator: Int128, by denominator: Int128) -> Int128 {
        let quotient = numerator / denominator
        let remainder = numerator % denominator
        if remainder.magnitude * 2 >= denominator.magnitude {
            return quotient + ((numerator < 0) != (denominator < 0) ? -1 : 1)
        }
        return quotient
    }
}

/// A currency with its ISO 4217 minor units, which invoices round to.
public struct Currency: Hashable, Sendable, CustomStringConvertible {
    public let code: String

    public init?(_ code: String) {
        guard code.utf8.count == 3, code.utf8.allSatisfy({ $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }) else { return nil }
        self.code = code
    }

    public var description: String { code }

    /// Digits after the decimal point in the currency's minor unit.
    public var minorUnitDigits: Int {
        switch code {
        case "JPY", "KRW", "CLP", "ISK", "VND", "XOF", "XAF", "UGX", "PYG", "RWF": 0
        case "BHD", "KWD", "OMR", "JOD", "TND", "LYD", "IQD": 3
        default: 2
        }
    }

    /// Nano-units in one minor unit (10,000,000 for USD).
    public var nanosPerMinorUnit: Int128 { Int128(Money.nanosPerUnit) / pow10(minorUnitDigits) }

    /// Rounds nano-units to a whole number of minor units (half away from zero), still in nano-units.
    /// Wide: rounding `Int64.max` nano-units up to the next cent leaves `Int64`.
    public func roundToMinorUnit(_ nanos: Int128) -> Int128 {
        Money.divideRounded(nanos, by: nanosPerMinorUnit) * nanosPerMinorUnit
    }

    /// Nano-units as text with exactly the minor-unit digits ("12.30 USD" style without the code).
    public func format(_ nanos: Int64) -> String { format(Int128(nanos)) }

    /// Nano-units as text with exactly the minor-unit digits.
    public func format(_ nanos: Int128) -> String {
        Money.format(Money.divideRounded(nanos, by: nanosPerMinorUnit), scale: minorUnitDigits)
    }
}

func pow10(_ exponent: Int) -> Int128 {
    var value: Int128 = 1
    for _ in 0..<exponent { value *= 10 }
    return value
}
