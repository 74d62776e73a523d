import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

struct Budgets: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Declare, remove and list customers' budgets (docs/budgets.md).",
        discussion: """
            A budget limits what a customer, or part of its usage picked by dimension values (team, end user, API key, \
            feature, model), may use per day, week, month or billing period, in tokens, a meter's units or money. \
            Budgets are declared by signed tally.budget records in the usage topic; the rater counts the usage after \
            the declaration, raises an alert once per period at each alert percentage and at the limit, and an enforced \
            budget makes the gateway and POST /v1/check refuse what would pass it.
            """,
        subcommands: [Set.self, Remove.self, List.self, Alerts.self])

    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Declare or change a budget: publish a signed tally.budget record.",
            discussion: """
                Changing only the limit, the alert percentages or --soft keeps what was counted this period; changing \
                the period, the measure or the dimensions starts counting again.
                """)
        @OptionGroup var kafka: KafkaOptions
        @OptionGroup var logging: LoggingOptions
        @OptionGroup var creditKeys: CreditKeyOptions
        @Option(help: "Customer id.") var customer: String
        @Option(help: "The budget's name: lower-case letters, digits, _ and -.") var budget: String
        @Option(help: "hour, day, week (from Monday, UTC), month (UTC), billing_period, or total (never resets).") var period = "month"
        @Option(help: "A limit in tokens (input plus output).") var tokens: String?
        @Option(help: "A limit in model calls.") var calls: String?
        @Option(help: "A limit in money, e.g. 50.00 (with --currency).") var amount: String?
        @Option(help: "ISO 4217 currency of --amount.") var currency = "USD"
        @Option(help: "A limit in units of this meter (with --quantity).") var meter: String?
        @Option(help: "The meter limit, in the meter's units.") var quantity: String?
        @Option(help: "Alert percentages, comma-separated, e.g. 50,80 (the limit itself always alerts).") var alertAt: String?
        @Flag(help: "Alerts only: the gateway and /v1/check do not refuse past the limit.") var soft = false
        @Option(help: "A dimension value the usage must have, name=value (repeatable): team=search, end_user=u1, model=gpt-4o.")
        var dimension: [String] = []
        @Option(help: "A dimension each value of which gets the limit on its own, e.g. run_id: a run past it is a runaway.") var per: String?
        @Option(help: "An anomaly watch instead of a budget: an hour at this factor times the mean of the hours before it (e.g. 5 or 2.5) alerts; the limit given is the least usage such an hour needs.")
        var anomalyFactor: String?
        @Option(help: "How many hours before an hour an anomaly watch compares it with (1 to 168).") var baselineHours = 24
        @Option(help: "The declaration's id (idempotency key). Default: a new one.") var id: String?
        @Option(help: "Event time (RFC 3339). Default: now.") var time: String?

        func run() async throws {
            var fields: [(String, String)] = [("period", "\"\(period)\"")]
            switch (tokens, amount, meter, calls) {
            case (let tokens?, nil, nil, nil): fields += [("measure", "\"tokens\""), ("limit", quoted(tokens))]
            case (nil, nil, nil, let calls?): fields += [("measure", "\"calls\""), ("limit", quoted(calls))]
            case (nil, let amount?, nil, nil): fields += [("measure", "\"money\""), ("currency", quoted(currency)), ("limit", quoted(amount))]
            case (nil, nil, let meter?, nil):
                guard let quantity else { throw ValidationError("--meter needs --quantity: the limit in the meter's units") }
                fields += [("measure", "\"meter\""), ("meter", quoted(meter)), ("limit", quoted(quantity))]
            default: throw ValidationError("give one limit: --tokens N, --calls N, --amount A (with --currency) or --meter M --quantity N")
            }
            if let alertAt {
                let percents = alertAt.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
                guard percents.allSatisfy({ $0 != nil }) else { throw ValidationError("--alert-at: whole percentages, e.g. 50,80") }
                fields.append(("alert_at", "[" + percents.map { String($0!) }.joined(separator: ",") + "]"))
            }
            if let anomalyFactor {
                fields[0] = ("period", "\"hour\"")
                fields.append(("anomaly", "{\"factor\":\(quoted(anomalyFactor)),\"baseline_hours\":\(baselineHours)}"))
                if alertAt != nil { throw ValidationError("--alert-at is not for an anomaly watch: it alerts when an hour is anomalous") }
            }
            fields.append(("enforce", soft || anomalyFactor != nil ? "false" : "true"))
            if !dimension.isEmpty {
                var pairs: [String] = []
                for item in dimension {
                    guard let equals = item.firstIndex(of: "="), equals != item.startIndex else { throw ValidationError("--dimension \(item): expected name=value") }
                    pairs.append("\(quoted(String(item[..<equals]))):\(quoted(String(item[item.index(after: equals)...])))")
                }
                fields.append(("dimensions", "{" + pairs.joined(separator: ",") + "}"))
            }
            if let per { fields.append(("per", quoted(per))) }
            if let id { fields.append(("id", quoted(id))) }
            if let time { fields.append(("time", quoted(time))) }
            try await publish(kafka: kafka, logging: logging, creditKeys: creditKeys, customer: customer, budget: budget, removed: false,
                              body: "{" + fields.map { "\(quoted($0.0)):\($0.1)" }.joined(separator: ",") + "}")
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a budget: publish a signed tally.budget record with removed: true.")
        @OptionGroup var kafka: KafkaOptions
        @OptionGroup var logging: LoggingOptions
        @OptionGroup var creditKeys: CreditKeyOptions
        @Option(help: "Customer id.") var customer: String
        @Option(help: "The budget's name.") var budget: String

        func run() async throws {
            try await publish(kafka: kafka, logging: logging, creditKeys: creditKeys, customer: customer, budget: budget, removed: true, body: "")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List budgets with what they counted in the current period and what is left.",
            discussion: "A budget per value (--per) shows its most used value (\"most used\") and the figures of that value.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "Only this customer's budgets.") var customer: String?
        @Option(help: "table, json or csv.") var format = "table"

        func run() throws {
            let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
            let standings = try BudgetStore(connection: connect(database, label: "tally.budgets")).standings(customerID: customer, at: now)
            let rows = standings.map { standing -> [String] in
                let definition = standing.definition
                let percent = Int128(standing.used) * 100 / Int128(definition.limit)
                return [standing.customerID, definition.name, definition.period.rawValue, definition.measure.unit,
                        definition.measure.format(definition.limit), definition.measure.format(standing.used),
                        definition.measure.format(max(0, standing.remaining)), "\(percent)%", EventTime.format(microseconds: standing.period.end),
                        definition.anomaly.map { "anomaly \($0.factorText)× over \($0.baselineHours) h" } ?? (definition.enforced ? "hard" : "soft"), definition.alertAt.map(String.init).joined(separator: ","), definition.dimensionsText,
                        definition.per.map { "\($0)=\(standing.value)" } ?? ""]
            }
            print(TableRenderer.render(header: ["customer", "budget", "period", "unit", "limit", "used", "left", "used %", "resets_at", "limit kind",
                                                "alert_at", "dimensions", "most used"], rows: rows, format: format, numericFrom: 4), terminator: "")
        }
    }

    struct Alerts: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List budget alerts (thresholds crossed and limits reached), newest first.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "Only this customer's alerts.") var customer: String?
        @Option(help: "At most this many.") var limit = 50
        @Option(help: "table, json or csv.") var format = "table"

        func run() throws {
            let result = try connect(database, label: "tally.budgets").query("""
                SELECT to_char(crossed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), customer_id, budget, kind, percent, measure, unit, used,
                       limit_value, to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"'), alert_id, coalesce(per || '=' || value, ''), baseline
                FROM budget_alerts WHERE $1::text IS NULL OR customer_id = $1 ORDER BY crossed_at DESC, alert_id LIMIT $2
                """, [customer, limit])
            let rows = try (0..<result.rowCount).map { row -> [String] in
                let measure = try BudgetRow.measure(result, row: row, kind: 5, unit: 6)
                return [try result.value(row, 0, as: String.self), try result.value(row, 1, as: String.self), try result.value(row, 2, as: String.self),
                        try result.value(row, 3, as: String.self), "\(try result.value(row, 4, as: Int64.self))%", measure.unit,
                        measure.format(try result.value(row, 7, as: Int64.self)), measure.format(try result.value(row, 8, as: Int64.self)),
                        try result.int64(row, 12).map(measure.format) ?? "", try result.value(row, 9, as: String.self),
                        try result.value(row, 11, as: String.self), try result.value(row, 10, as: String.self)]
            }
            print(TableRenderer.render(header: ["crossed_at", "customer", "budget", "kind", "percent", "unit", "used", "limit", "baseline", "period",
                                                "value", "alert"],
                                       rows: rows, format: format, numericFrom: 6), terminator: "")
        }
    }
}

/// A JSON string literal.
private func quoted(_ text: String) -> String {
    var json = JSONWriter(capacity: text.utf8.count + 2)
    json.string(text)
    return String(decoding: json.bytes, as: UTF8.self)
}

/// Validates the request as the ingest API does, then signs and publishes it.
private func publish(kafka: KafkaOptions, logging: LoggingOptions, creditKeys: CreditKeyOptions, customer: String, budget: String,
                     removed: Bool, body: String) async throws {
    let logger = makeLogger(logging, label: "tally.budgets")
    let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
    let (event, bytes): (BudgetEvent, [UInt8])
    switch BudgetRequest.event(customerID: customer, budget: budget, body: Array(body.utf8), removed: removed, nowMicroseconds: now) {
    case .failure(let error): throw ValidationError("invalid budget: " + error.violations.map { "\($0.path.isEmpty ? "" : $0.path + ": ")\($0.reason)" }.joined(separator: "; "))
    case .success(let made): (event, bytes) = made
    }
    let keyring = try creditKeys.signingKeyring(logger: logger)
    let producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties), logger: logger)
    let report = try await producer.send(ProducerRecord.signedCredit(topic: kafka.topic, customerID: customer, value: bytes, keyring: keyring)!)
    await producer.close()
    print(event.id)
    print("budget \(budget) of \(customer) \(removed ? "removed" : "declared") (partition \(report.partition), offset \(report.offset)); "
          + "see tally budgets list once the rater has read it", to: &standardError)
}
