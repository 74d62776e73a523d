import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyPipeline
import TallyPostgres

struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a self-contained HTML report of a customer's billing period: tokens per day per model, spend per day, balance over time.",
        discussion: "Charts are inline SVG with the numbers in tables beside them; no network access is needed to view the file.")
    @OptionGroup var database: DatabaseOptions
    @Option(help: "The customer; all customers with usage when omitted.") var customer: String?
    @Option(help: "The billing period, YYYY-MM (starting on the customer's anchor day).") var period: String
    @Option(help: "Folder for the reports (report-<customer>-<period>.html).") var outputDir = "."

    func validate() throws {
        guard BillingPeriod.parse(period, anchorDay: 1) != nil else { throw ValidationError("--period \(period): expected YYYY-MM") }
    }

    func run() throws {
        let connection = try connect(database, label: "tally.report")
        let customers = try customer.map { [$0] } ?? connection.query("""
            SELECT DISTINCT customer_id FROM usage_windows UNION SELECT DISTINCT customer_id FROM wallet_ledger
            UNION SELECT DISTINCT customer_id FROM wallet_overage ORDER BY 1
            """).rows.compactMap { $0[0] }
        let profiles = try BillingCatalogStore(connection: connection).profiles(customers)
        try FileManager.default.createDirectory(atPath: outputDir, withIntermediateDirectories: true)
        for customerID in customers {
            let profile = profiles[customerID] ?? BillingProfile(customerID: customerID)
            let report = try load(connection, profile: profile, period: BillingPeriod.parse(period, anchorDay: profile.anchorDay)!)
            // Customer ids are free text: keep the file name to safe characters.
            let safe = String(customerID.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" ? $0 : "_" })
            let path = (outputDir as NSString).appendingPathComponent("report-\(safe)-\(period).html")
            try UsageReportRenderer.html(report).write(toFile: path, atomically: true, encoding: .utf8)
            print("\(path): \(report.totalTokens) tokens, spend \(report.currency.format(report.totalSpendNanos)) \(report.currency)")
        }
    }

    func load(_ connection: PostgresConnection, profile: BillingProfile, period: BillingPeriod) throws -> UsageReport {
        let days = UsageReport.days(of: period)
        let index = Dictionary(uniqueKeysWithValues: days.enumerated().map { ($1, $0) })
        let range: [(any PostgresEncodable)?] = [profile.customerID, EventTime.format(microseconds: period.start), EventTime.format(microseconds: period.end)]
        // 128 bits: window sums (numeric) and a period's spend pass Int64 on extreme inputs.
        var tokens: [String: [Int128]] = [:]
        var events: Int128 = 0
        let usage = try connection.query("""
            SELECT model, day::text, total_tokens, event_count FROM dashboard_usage_daily
            WHERE customer_id = $1 AND day >= ($2::timestamptz AT TIME ZONE 'UTC')::date AND day < ($3::timestamptz AT TIME ZONE 'UTC')::date
            """, range)
        for row in 0..<usage.rowCount {
            guard let day = index[try usage.value(row, 1, as: String.self)] else { continue }
            tokens[try usage.value(row, 0, as: String.self), default: Array(repeating: 0, count: days.count)][day] += try usage.value(row, 2, as: Int128.self)
            events += try usage.value(row, 3, as: Int128.self)
        }
        let currency = range + [profile.currency.code]
        var spend = Array(repeating: Int128(0), count: days.count)
        var change = Array(repeating: Int128(0), count: days.count)
        // The ledger's entries and the overage entries (one per day, dated at its start).
        let entries = """
            (SELECT customer_id, currency, kind, amount_nanos::numeric AS amount_nanos, effective_at FROM wallet_ledger
             UNION ALL SELECT customer_id, currency, 'usage', amount_nanos, day::timestamp AT TIME ZONE 'UTC' FROM wallet_overage) e
            """
        let ledger = try connection.query("""
            SELECT (effective_at AT TIME ZONE 'UTC')::date::text, -sum(amount_nanos) FILTER (WHERE kind = 'usage'), sum(amount_nanos)
            FROM \(entries) WHERE customer_id = $1 AND currency = $4 AND effective_at >= $2::timestamptz AND effective_at < $3::timestamptz
            GROUP BY 1
            """, currency)
        for row in 0..<ledger.rowCount {
            guard let day = index[try ledger.value(row, 0, as: String.self)] else { continue }
            spend[day] = try ledger.int128(row, 1) ?? 0
            change[day] = try ledger.int128(row, 2) ?? 0
        }
        let opening = try connection.query("""
            SELECT coalesce(sum(amount_nanos), 0) FROM \(entries) WHERE customer_id = $1 AND currency = $3 AND effective_at < $2::timestamptz
            """, [profile.customerID, EventTime.format(microseconds: period.start), profile.currency.code]).int128(0, 0) ?? 0
        var balance: [Int128] = []
        var running = opening
        for delta in change { running += delta; balance.append(running) }
        return UsageReport(customerID: profile.customerID, period: period, currency: profile.currency, days: days, tokensByModel: tokens,
                           spendNanos: spend, balanceNanos: balance, eventCount: events)
    }
}
