import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyPipeline
import TallyPostgres

struct Meters: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage the versioned meter catalog (tally.meter_catalogs).",
        subcommands: [Apply.self, List.self, Show.self])

    struct Apply: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a meter catalog (YAML or JSON) and store it as the next version.",
            discussion: """
                Errors name the line and field. A version may add meters and relabel units; it may not drop a meter or change \
                its aggregation or dimensions (declare a new meter instead). Readings of a meter counted before it was \
                declared are folded into its windows. Applying an unchanged catalog again stores nothing.
                """)
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The meter catalog file; - reads standard input.") var file: String
        @Flag(help: "Only validate and print the canonical form.") var dryRun = false

        func run() throws {
            let catalog: MeterCatalog
            do { catalog = try MeterCatalog.parse(try readText(file)) } catch let error as ConfigError {
                throw ValidationError("\(file): \(error)")
            }
            if dryRun { print(catalog.canonicalJSON, terminator: ""); return }
            let applied: MeterCatalogApplied
            do { applied = try MeterCatalogStore(connection: try connect(database, label: "tally.meters")).apply(catalog) } catch let refusal as MeterCatalogRefusal {
                throw ValidationError("\(file): \(refusal)")
            }
            guard applied.created else { print("meter catalog version \(applied.version) is identical; nothing stored"); return }
            let folded = applied.foldedReadings == 0 ? "" : "; \(applied.foldedReadings) readings counted while undeclared folded into their windows"
            print("applied meter catalog version \(applied.version): \(catalog.meters.count) meters\(folded)")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the meters the catalog in force declares.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "table, json or csv.") var format = "table"

        func run() throws {
            let latest = try MeterCatalogStore(connection: try connect(database, label: "tally.meters")).latest()
            let rows = (latest?.catalog.meters.values.sorted { $0.name < $1.name } ?? []).map { meter -> [String] in
                let property = if case .uniqueCount(let property) = meter.aggregation { property } else { "" }
                return [meter.name, meter.unit, meter.aggregation.name, property, meter.dimensions.joined(separator: ","), String(latest!.version)]
            }
            print(TableRenderer.render(header: ["meter", "unit", "aggregation", "property", "dimensions", "version"], rows: rows,
                                       format: format, numericFrom: 6), terminator: "")
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a stored meter catalog version (default: the latest) as canonical JSON.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "The version to print.") var version: Int?

        func run() throws {
            let versions = try MeterCatalogStore(connection: try connect(database, label: "tally.meters")).versions()
            guard let shown = version.map({ wanted in versions.first { $0.version == wanted } }) ?? versions.last else {
                throw ValidationError(version.map { "no meter catalog version \($0)" } ?? "no meter catalog applied yet (tally meters apply FILE)")
            }
            print(shown.catalog.canonicalJSON, terminator: "")
        }
    }
}
