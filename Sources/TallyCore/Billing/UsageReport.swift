/// One customer's billing period for people who would rather look than read: tokens per day per
/// model, spend per day and the balance at the end of each day, with the numbers beside the charts.
public struct UsageReport: Sendable {
    public let customerID: String
    public let period: BillingPeriod
    public let currency: Currency
    /// Days of the period (UTC, `YYYY-MM-DD`), in order.
    public let days: [String]
    /// model → tokens per day (aligned with `days`).
    public let tokensByModel: [String: [Int128]]
    /// Charges per day in nano-units (aligned with `days`).
    public let spendNanos: [Int128]
    /// Wallet balance at the end of each day in nano-units (aligned with `days`).
    public let balanceNanos: [Int128]
    public let eventCount: Int128

    public init(customerID: String, period: BillingPeriod, currency: Currency, days: [String], tokensByModel: [String: [Int128]],
                spendNanos: [Int128], balanceNanos: [Int128], eventCount: Int128) {
        self.customerID = customerID
        self.period = period
        self.currency = currency
        self.days = days
        self.tokensByModel = tokensByModel
        self.spendNanos = spendNanos
        self.balanceNanos = balanceNanos
        self.eventCount = eventCount
    }

    public var totalTokens: Int128 { tokensByModel.values.reduce(0) { $0 + $1.reduce(0, +) } }
    public var totalSpendNanos: Int128 { spendNanos.reduce(0, +) }

    /// The days of a period, `YYYY-MM-DD`.
    public static func days(of period: BillingPeriod) -> [String] {
        stride(from: period.start, to: period.end, by: 86_400_000_000).map { String(EventTime.format(microseconds: $0).prefix(10)) }
    }
}

public enum UsageReportRenderer {
    static let palette = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]

    public static func html(_ report: UsageReport) -> String {
        let currency = report.currency
        let models = report.tokensByModel.keys.sorted()
        let tokenChart = lineChart(series: models.enumerated().map { (name: $1, color: palette[$0 % palette.count], values: report.tokensByModel[$1]!) },
                                   labels: report.days, title: "Tokens per day and model")
        let spendChart = barChart(values: report.spendNanos, labels: report.days, title: "Spend per day (\(currency))")
        let balanceChart = lineChart(series: [(name: "balance", color: "#4e79a7", values: report.balanceNanos)], labels: report.days,
                                     title: "Balance at the end of each day (\(currency))", format: { currency.format($0) })
        var rows = ""
        for (index, day) in report.days.enumerated() {
            let tokens = models.map { report.tokensByModel[$0]![index] }.reduce(0, +)
            rows += "<tr><td>\(day)</td><td class=\"n\">\(tokens)</td><td class=\"n\">\(currency.format(report.spendNanos[index]))</td><td class=\"n\">\(currency.format(report.balanceNanos[index]))</td></tr>\n"
        }
        var modelRows = ""
        for (index, model) in models.enumerated() {
            modelRows += "<tr><td><span class=\"key\" style=\"background:\(palette[index % palette.count])\"></span>\(escape(model))</td><td class=\"n\">\(report.tokensByModel[model]!.reduce(0, +))</td></tr>\n"
        }
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>Usage of \(escape(report.customerID)), \(report.period.label)</title>
            <style>body{font-family:sans-serif;max-width:64em;margin:2em auto;color:#222}table{border-collapse:collapse}
            td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}.n{text-align:right;font-variant-numeric:tabular-nums}
            .key{display:inline-block;width:.8em;height:.8em;margin-right:.4em}.totals td{font-weight:bold}svg{margin:1em 0}</style></head>
            <body><h1>Usage of \(escape(report.customerID))</h1>
            <p>Billing period \(report.period.label): \(report.days.first ?? "") to \(report.days.last ?? "") (UTC)</p>
            <table class="totals"><tr><td>Tokens</td><td class="n" id="total-tokens">\(report.totalTokens)</td></tr>
            <tr><td>Model calls</td><td class="n" id="total-events">\(report.eventCount)</td></tr>
            <tr><td>Spend</td><td class="n" id="total-spend">\(currency.format(report.totalSpendNanos)) \(currency)</td></tr>
            <tr><td>Balance at the end</td><td class="n" id="closing-balance">\(currency.format(report.balanceNanos.last ?? 0)) \(currency)</td></tr></table>
            \(tokenChart)
            <table><tr><th>Model</th><th class="n">Tokens</th></tr>
            \(modelRows)</table>
            \(spendChart)
            \(balanceChart)
            <h2>Per day</h2>
            <table><tr><th>Day</th><th class="n">Tokens</th><th class="n">Spend</th><th class="n">Balance</th></tr>
            \(rows)</table>
            </body></html>

            """
    }

    static let width = 720.0, height = 220.0, left = 70.0, bottom = 30.0, top = 24.0

    /// x position of the i-th of n points.
    static func x(_ index: Int, _ count: Int) -> Double {
        left + (width - left - 10) * (count <= 1 ? 0.5 : Double(index) / Double(count - 1))
    }

    static func frame(_ title: String, low: Int128, high: Int128, labels: [String], format: (Int128) -> String, _ content: String) -> String {
        let first = labels.first.map { escape(String($0.suffix(5))) } ?? "", last = labels.last.map { escape(String($0.suffix(5))) } ?? ""
        return """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" role="img" aria-label="\(escape(title))">
            <text x="\(Int(left))" y="16" font-size="14">\(escape(title))</text>
            <line x1="\(Int(left))" y1="\(Int(height - bottom))" x2="\(Int(width - 10))" y2="\(Int(height - bottom))" stroke="#999"/>
            <line x1="\(Int(left))" y1="\(Int(top))" x2="\(Int(left))" y2="\(Int(height - bottom))" stroke="#999"/>
            <text x="\(Int(left) - 4)" y="\(Int(top) + 4)" font-size="10" text-anchor="end">\(escape(format(high)))</text>
            <text x="\(Int(left) - 4)" y="\(Int(height - bottom))" font-size="10" text-anchor="end">\(escape(format(low)))</text>
            <text x="\(Int(left))" y="\(Int(height) - 8)" font-size="10">\(first)</text>
            <text x="\(Int(width) - 10)" y="\(Int(height) - 8)" font-size="10" text-anchor="end">\(last)</text>
            \(content)</svg>
            """
    }

    static func y(_ value: Int128, low: Int128, high: Int128) -> Double {
        let span = Double(max(high - low, 1))
        return (height - bottom) - (height - bottom - top) * Double(value - low) / span
    }

    static func lineChart(series: [(name: String, color: String, values: [Int128])], labels: [String], title: String,
                          format: (Int128) -> String = { String($0) }) -> String {
        let all = series.flatMap(\.values)
        let low = min(all.min() ?? 0, 0), high = max(all.max() ?? 1, 1)
        let lines = series.map { line in
            let points = line.values.enumerated().map { "\(String(format: x($0, line.values.count))),\(String(format: y($1, low: low, high: high)))" }
            return "<polyline fill=\"none\" stroke=\"\(line.color)\" stroke-width=\"1.5\" points=\"\(points.joined(separator: " "))\"><title>\(escape(line.name))</title></polyline>"
        }.joined(separator: "\n")
        return frame(title, low: low, high: high, labels: labels, format: format, lines)
    }

    static func barChart(values: [Int128], labels: [String], title: String) -> String {
        let high = max(values.max() ?? 1, 1)
        let slot = (width - left - 10) / Double(max(values.count, 1))
        let bars = values.enumerated().map { index, value in
            let top = y(value, low: 0, high: high)
            return "<rect x=\"\(String(format: left + slot * Double(index) + 1))\" y=\"\(String(format: top))\" width=\"\(String(format: max(slot - 2, 1)))\" height=\"\(String(format: (height - bottom) - top))\" fill=\"#f28e2b\"><title>\(escape(labels[index])): \(Money.format(nanos: value))</title></rect>"
        }.joined(separator: "\n")
        return frame(title, low: 0, high: high, labels: labels, format: { Money.format(nanos: $0) }, bars)
    }

    static func format(_ value: Double) -> String { ConsoleHTML.format(value) }

    static func escape(_ text: String) -> String { ConsoleHTML.escape(text) }
}

private extension String {
    init(format value: Double) { self = UsageReportRenderer.format(value) }
}
