import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyPipeline
import TallyPostgres

struct Usage: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show usage from the materialized windows (the exact hourly windows, rolled up to days or months).")

    enum Granularity: String, ExpressibleByArgument, CaseIterable { case hour, day, month }
    enum Format: String, ExpressibleByArgument, CaseIterable { case table, json, csv }

    @OptionGroup var database: DatabaseOptions
    @Option(help: "Only this customer (default: every customer, one row each).") var customer: String?
    @Option(help: "Windows overlapping [--from, --to), each whole (RFC 3339).") var from: String?
    @Option(help: "End of the range (RFC 3339, exclusive).") var to: String?
    @Option(help: "Window size: hour, day or month.") var granularity: Granularity = .day
    @Option(help: "Comma-separated dimensions to split by: model, feature, provider, environment, status (how calls ended).") var groupBy = ""
    @Option(help: "table, json or csv.") var format: Format = .table
    @Option(help: "Show this meter's windows instead of tokens; --group-by then names the meter's declared dimensions.") var meter: String?

    func parsedGroupBy() throws -> Set<String> {
        let names = Set(groupByList)
        // A meter's dimensions are checked against its declaration when the catalog is read.
        guard meter == nil else { return names }
        for name in names where !UsageQuery.dimensions.contains(name) {
            throw ValidationError("--group-by \(name): expected some of model, feature, provider, environment, status")
        }
        return names
    }

    func validate() throws {
        _ = try parsedGroupBy()
        for (flag, value) in [("--from", from), ("--to", to)] {
            if let value, EventTime(value) == nil { throw ValidationError("\(flag) \(value) is not an RFC 3339 time with offset") }
        }
    }

    var groupByList: [String] {
        var seen = Set<String>()
        return groupBy.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty && seen.insert($0).inserted }
    }

    func run() throws {
        let split = try parsedGroupBy()
        let connection = try PostgresConnection(url: try database.databaseURL, logger: .init(label: "tally.usage"), searchPath: "tally")
        if let meter { return try runMeter(meter, connection: connection) }
        let rows = try UsageQuery.run(connection, customerID: customer, granularity: TallyCore.Granularity(rawValue: granularity.rawValue)!,
                                      from: from.flatMap { EventTime($0)?.microseconds }, to: to.flatMap { EventTime($0)?.microseconds }, groupBy: split)
        let shown = UsageQuery.dimensions.filter(split.contains)
        let header = ["window_start", "customer"] + shown + ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens",
                                                             "reasoning_output_tokens", "total_tokens", "event_count"]
        let table: [[String]] = rows.map { row in
            [EventTime.format(microseconds: row.windowStart), row.customerID] + shown.map { (row.dimensions[$0] ?? nil) ?? "" }
                + [row.inputTokens, row.outputTokens, row.cacheReadInputTokens, row.cacheWriteInputTokens, row.reasoningOutputTokens,
                   row.totalTokens, row.eventCount].map { String($0) }
        }
        print(TableRenderer.render(header: header, rows: table, format: format.rawValue, numericFrom: 2 + shown.count), terminator: "")
    }

    private func runMeter(_ meter: String, connection: PostgresConnection) throws {
        let granularity: TallyCore.Granularity = switch granularity {
        case .hour: .hour
        case .day: .day
        case .month: .month
        }
        let dimensions = groupByList
        let rows: [MeterUsageRow]
        do {
            rows = try MeterUsageQuery.run(connection, meter: meter, granularity: granularity, customerID: customer, from: from, to: to, groupBy: dimensions)
        } catch let failure as MeterUsageQuery.Failure {
            throw ValidationError("--meter \(meter): \(failure)")
        }
        print(TableRenderer.render(header: ["window_start", "customer"] + dimensions + [meter],
                                   rows: rows.map { [$0.windowStart, $0.customerID] + $0.dimensions + [$0.value] },
                                   format: format.rawValue, numericFrom: dimensions.count + 2), terminator: "")
    }
}

/// Renders rows as an aligned table, JSON (array of objects) or CSV.
enum TableRenderer {
    static func render(header: [String], rows: [[String]], format: String, numericFrom: Int) -> String {
        switch format {
        case "json":
            var json = JSONWriter()
            json.raw("[")
            for (index, row) in rows.enumerated() {
                json.raw(index == 0 ? "\n  {" : ",\n  {")
                for (column, name) in header.enumerated() {
                    json.key(name, first: column == 0)
                    // Window sums are numeric and may pass Int64: still JSON numbers.
                    if column >= numericFrom, Int128(row[column]) != nil { json.raw(row[column]) } else { json.string(row[column]) }
                }
                json.raw("}")
            }
            json.raw(rows.isEmpty ? "]\n" : "\n]\n")
            return String(decoding: json.bytes, as: UTF8.self)
        case "csv":
            func field(_ text: String) -> String {
                text.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" }) ? "\"" + text.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : text
            }
            return ([header] + rows).map { $0.map(field).joined(separator: ",") }.joined(separator: "\n") + "\n"
        default:
            let widths = header.indices.map { column in max(header[column].count, rows.map { $0[column].count }.max() ?? 0) }
            func line(_ cells: [String]) -> String {
                cells.enumerated().map { column, text in
                    let pad = String(repeating: " ", count: widths[column] - text.count)
                    return column >= numericFrom ? pad + text : text + pad
                }.joined(separator: "  ")
            }
            var out = line(header) + "\n" + widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ") + "\n"
            for row in rows { out += line(row) + "\n" }
            return out + "(\(rows.count) rows)\n"
        }
    }
}
