/// Building blocks of the web console's pages (rendered on the server, no JavaScript): readable
/// figures, charts as inline SVG with rounded axes, accessible tables, one page frame.
public enum ConsoleHTML {
    // MARK: Figures

    /// A whole number with thousands separators: `1234567` → `1,234,567`.
    public static func grouped(_ value: Int128) -> String {
        let digits = String(value.magnitude)
        var out = ""
        for (index, digit) in digits.enumerated() {
            if index > 0 && (digits.count - index) % 3 == 0 { out.append(",") }
            out.append(digit)
        }
        return (value < 0 ? "-" : "") + out
    }

    /// Money rounded to the currency's minor unit with thousands separators: `USD 1,234.56`.
    public static func money(_ nanos: Int128, _ currency: Currency) -> String {
        let text = currency.format(nanos)
        let negative = text.hasPrefix("-")
        let unsigned = negative ? String(text.dropFirst()) : text
        let whole = unsigned.split(separator: ".", maxSplits: 1).first.map(String.init) ?? unsigned
        let fraction = unsigned.dropFirst(whole.count)
        return "\(currency.code) \(negative ? "-" : "")\(grouped(Int128(whole) ?? 0))\(fraction)"
    }

    /// A short figure for axis labels: `1.5M`, `250k`, `900`.
    public static func compact(_ value: Int128) -> String {
        let units: [(Int128, String)] = [(1_000_000_000_000, "T"), (1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")]
        for (size, suffix) in units where value.magnitude >= size.magnitude {
            let tenths = value / (size / 10)
            return "\(tenths / 10)\(tenths % 10 == 0 ? "" : ".\((tenths % 10).magnitude)")\(suffix)"
        }
        return String(value)
    }

    /// An axis label for money: whole units, compact past a thousand (`USD 1.5k`), else to the minor unit.
    public static func moneyLabel(_ nanos: Int128, _ currency: Currency) -> String {
        nanos.magnitude >= 1_000_000_000_000 ? "\(currency.code) \(compact(nanos / 1_000_000_000))" : money(nanos, currency)
    }

    /// The top of an axis holding `high` and its step: 1, 2 or 5 times a power of ten, so
    /// gridlines fall on round figures (4 to 10 steps).
    public static func niceAxis(_ high: Int128) -> (top: Int128, step: Int128) {
        guard high > 0 else { return (1, 1) }
        // Rounding up could pass Int128's range: an axis that large is drawn to its value.
        guard high <= Int128.max / 100 else { return (high, high) }
        var magnitude: Int128 = 1
        while magnitude <= high / 10 { magnitude *= 10 }
        for factor: Int128 in [1, 2, 5, 10] {
            let step = magnitude * factor / 5 > 0 ? magnitude * factor / 5 : 1
            let top = (high + step - 1) / step * step
            if top / step <= 10 { return (top, step) }
        }
        return (magnitude * 10, magnitude * 2)
    }

    /// Text for HTML content and attribute values.
    public static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for character in text {
            switch character {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(character)
            }
        }
        return out
    }

    // MARK: Charts

    /// A bar chart as inline SVG: rounded gridlines labelled by `label`, each bar titled with its
    /// exact figure. Screen readers get the `summary`; the page shows the same numbers in a table.
    public static func barChart(title: String, summary: String, bars: [(label: String, value: Int128)],
                                label: (Int128) -> String = compact, exact: (Int128) -> String = grouped) -> String {
        let width = 760.0, height = 240.0, left = 64.0, right = 12.0, top = 16.0, bottom = 36.0
        let (axisTop, step) = niceAxis(bars.map(\.value).max() ?? 0)
        func y(_ value: Int128) -> Double { (height - bottom) - (height - bottom - top) * Double(value) / Double(axisTop) }
        var svg = """
            <figure><svg viewBox="0 0 \(Int(width)) \(Int(height))" role="img" aria-labelledby="\(id(title))-t \(id(title))-d" class="chart">
            <title id="\(id(title))-t">\(escape(title))</title><desc id="\(id(title))-d">\(escape(summary))</desc>
            """
        for index in 0...Int(axisTop / step) {
            let tick = step * Int128(index)
            let position = format(y(tick))
            svg += "<line x1=\"\(Int(left))\" x2=\"\(Int(width - right))\" y1=\"\(position)\" y2=\"\(position)\" class=\"grid\"/>"
            svg += "<text x=\"\(Int(left) - 6)\" y=\"\(position)\" dy=\"0.32em\" text-anchor=\"end\">\(escape(label(tick)))</text>"
        }
        let slot = (width - left - right) / Double(max(bars.count, 1))
        let every = max(1, bars.count / 8)
        for (index, bar) in bars.enumerated() {
            let x = left + slot * Double(index)
            let barTop = y(max(bar.value, 0))
            // Bars at most 48 px wide, centred in their slot: one month is not a wall.
            let barWidth = min(max(slot * 0.7, 1), 48)
            svg += "<rect x=\"\(format(x + (slot - barWidth) / 2))\" y=\"\(format(barTop))\" width=\"\(format(barWidth))\" height=\"\(format((height - bottom) - barTop))\" class=\"bar\">"
            svg += "<title>\(escape(bar.label)): \(escape(exact(bar.value)))</title></rect>"
            if index % every == 0 {
                svg += "<text x=\"\(format(x + slot / 2))\" y=\"\(Int(height - bottom) + 16)\" text-anchor=\"middle\">\(escape(bar.label))</text>"
            }
        }
        return svg + "</svg><figcaption>\(escape(title))</figcaption></figure>"
    }

    // MARK: Tables and pages

    /// A table with a caption and column headers; `numeric` columns are right-aligned figures.
    /// Cells are HTML already (escape text before); an empty table says so.
    public static func table(caption: String, headers: [String], numeric: Set<Int> = [], rows: [[String]], id: String? = nil) -> String {
        var html = "<table\(id.map { " id=\"\(escape($0))\"" } ?? "")><caption>\(escape(caption))</caption><thead><tr>"
        for (index, header) in headers.enumerated() {
            html += "<th scope=\"col\"\(numeric.contains(index) ? " class=\"n\"" : "")>\(escape(header))</th>"
        }
        html += "</tr></thead><tbody>"
        if rows.isEmpty { html += "<tr><td colspan=\"\(headers.count)\" class=\"empty\">None yet.</td></tr>" }
        for row in rows {
            html += "<tr>"
            for (index, cell) in row.enumerated() {
                html += index == 0 ? "<th scope=\"row\">\(cell)</th>" : "<td\(numeric.contains(index) ? " class=\"n\"" : "")>\(cell)</td>"
            }
            html += "</tr>"
        }
        return html + "</tbody></table>"
    }

    /// A figure a test or a reader can find: the shown text, with the exact value in `data-value`.
    public static func figure(_ name: String, shown: String, exact: String) -> String {
        "<span data-figure=\"\(escape(name))\" data-value=\"\(escape(exact))\">\(escape(shown))</span>"
    }

    /// A whole page: skip link, navigation, main content.
    public static func page(title: String, navigation: [(href: String, label: String)], current: String, body: String) -> String {
        let links = navigation.map { link in
            "<a href=\"\(escape(link.href))\"\(link.href == current ? " aria-current=\"page\"" : "")>\(escape(link.label))</a>"
        }.joined(separator: " ")
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
            <title>\(escape(title)) · Tally</title><style>\(style)</style></head>
            <body><a class="skip" href="#main">Skip to content</a>
            <header><span class="brand">Tally</span><nav aria-label="Console">\(links)</nav></header>
            <main id="main"><h1>\(escape(title))</h1>
            \(body)
            </main></body></html>

            """
    }

    /// Dark text on white (contrast above 7:1), visible focus, figures in tabular digits; two
    /// columns on a laptop screen, one on a narrow one.
    static let style = """
        :root{color-scheme:light}body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1a1a1a;background:#fff}
        header{display:flex;gap:2em;align-items:center;padding:.6em 1.5em;background:#12263f;color:#fff}header a{color:#fff}
        .brand{font-weight:700;font-size:1.1em}nav a{margin-right:1.2em}a{color:#0b4f9c}a:focus,a:hover{outline:3px solid #f5b301;outline-offset:2px}
        main{max-width:78em;margin:0 auto;padding:1em 1.5em 3em}h1{font-size:1.5em;margin:.4em 0 .6em}h2{font-size:1.15em;margin:1.6em 0 .4em}
        .skip{position:absolute;left:-999px}.skip:focus{left:1em;top:1em;background:#fff;color:#000;padding:.4em;z-index:2}
        .tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(13em,1fr));gap:.8em;margin:0;padding:0}
        .tile{border:1px solid #c9d1db;border-radius:6px;padding:.6em .9em}.tile dt{color:#3d4a5c;font-size:.9em}.tile dd{margin:0;font-size:1.35em;font-weight:600;font-variant-numeric:tabular-nums}
        .cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(30em,1fr));gap:0 2em}
        table{border-collapse:collapse;width:100%;margin:.4em 0 1em}caption{text-align:left;font-weight:600;padding:.3em 0;color:#1a1a1a}
        th,td{border-bottom:1px solid #dde3ea;padding:.35em .6em;text-align:left;vertical-align:top}thead th{background:#f1f4f8}
        .n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.empty{color:#3d4a5c;font-style:italic}
        .warn{color:#8a1c00;font-weight:600}.ok{color:#1d5e20}figure{margin:.5em 0 1.2em}figcaption{font-size:.9em;color:#3d4a5c}
        .chart{width:100%;height:auto;max-height:280px}.chart text{font-size:11px;fill:#3d4a5c}.chart .grid{stroke:#e3e8ee}.chart .bar{fill:#2f6db5}
        pre{background:#f1f4f8;padding:.8em;overflow:auto;font-size:.85em}
        """

    /// An id for SVG title and desc elements from a chart's title.
    static func id(_ text: String) -> String {
        "c" + String(text.unicodeScalars.filter { $0.properties.isAlphabetic || ("0"..."9").contains($0) }.prefix(40).map(Character.init))
    }

    /// One decimal place is plenty for pixel coordinates.
    static func format(_ value: Double) -> String {
        let tenths = Int64((value * 10).rounded())
        return "\(tenths / 10).\(abs(tenths % 10))"
    }
}
