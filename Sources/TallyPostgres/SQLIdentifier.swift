/// A PostgreSQL identifier (a schema, table or column name, optionally qualified by its schema)
/// for SQL text: the one way a name that is not written out in a statement gets into it.
/// Interpolated, it is a quoted identifier — double quotes, an embedded double quote doubled
/// (PostgreSQL, "Identifiers and Key Words", §4.1.1) — so any name is one identifier and keeps
/// its case; values stay bound parameters (see `PostgresQuery`).
public struct SQLIdentifier: Sendable, Hashable, CustomStringConvertible {
    /// The name itself, unquoted (for display and for comparisons with catalog text).
    public let name: String
    /// The schema that qualifies it, if any.
    public let schema: String?

    public init(_ name: String) {
        self.name = name
        schema = nil
    }

    private init(_ name: String, in schema: String) {
        self.name = name
        self.schema = schema
    }

    /// The schema of Tally's live state.
    public static let tally = SQLIdentifier("tally")

    /// `"schema"."name"` or `"name"`, ready for SQL text.
    public var description: String { (schema.map { Self.quote($0) + "." } ?? "") + Self.quote(name) }

    /// `table` in the schema this identifier names: `"schema"."table"`.
    public func qualifying(_ table: String) -> SQLIdentifier { SQLIdentifier(table, in: name) }

    private static func quote(_ name: String) -> String { "\"" + name.replacingOccurrences(of: "\"", with: "\"\"") + "\"" }
}
