/// A PostgreSQL identifier (a schema, table or column name) for SQL text: the one way a name that
/// is not written out in a statement gets into it. Interpolated, it is a quoted identifier —
/// double quotes, an embedded double quote doubled (PostgreSQL, "Identifiers and Key Words",
/// §4.1.1) — so any name is one identifier and keeps its case; values stay bound parameters.
public struct SQLIdentifier: Sendable, Hashable, CustomStringConvertible {
    /// The name itself, unquoted (for display and for comparisons with catalog text).
    public let name: String

    public init(_ name: String) { self.name = name }

    /// The schema of Tally's live state.
    public static let tally = SQLIdentifier("tally")

    /// `"name"`, ready for SQL text.
    public var description: String { "\"" + name.replacingOccurrences(of: "\"", with: "\"\"") + "\"" }

    /// `"schema"."table"`: `table` in this schema.
    public func qualifying(_ table: String) -> String { "\(self).\(SQLIdentifier(table))" }
}
