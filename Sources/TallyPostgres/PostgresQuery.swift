/// SQL text built by string interpolation, in which every interpolated value becomes a bound
/// parameter (`$1`, `$2`, … in order) and every interpolated `SQLIdentifier` a quoted name, so
/// that each value stands beside the column it fills and none is ever spliced into the text:
///
///     try connection.query(bound: """
///         INSERT INTO \(SQLIdentifier.tally.qualifying("items")) (id, name) VALUES (\(id), \(name))
///         """)
///
/// Fragments of SQL that the code itself composes (never input) go in with `\(unescaped:)`.
public struct PostgresQuery: ExpressibleByStringInterpolation, Sendable {
    public private(set) var sql: String
    public private(set) var parameters: [(any PostgresEncodable)?]

    public init(stringLiteral value: String) {
        sql = value
        parameters = []
    }

    public init(stringInterpolation: StringInterpolation) {
        sql = stringInterpolation.sql
        parameters = stringInterpolation.parameters
    }

    public struct StringInterpolation: StringInterpolationProtocol {
        var sql = ""
        var parameters: [(any PostgresEncodable)?] = []

        public init(literalCapacity: Int, interpolationCount: Int) {
            sql.reserveCapacity(literalCapacity + interpolationCount * 3)
            parameters.reserveCapacity(interpolationCount)
        }

        public mutating func appendLiteral(_ literal: String) { sql += literal }

        /// A value: bound as the next parameter (NULL when nil).
        public mutating func appendInterpolation(_ value: (any PostgresEncodable)?) {
            parameters.append(value)
            sql += "$\(parameters.count)"
        }

        /// A schema, table or column name: quoted.
        public mutating func appendInterpolation(_ identifier: SQLIdentifier) { sql += identifier.description }

        /// SQL the code composed itself (a fixed expression, a qualified name): inserted as is.
        public mutating func appendInterpolation(unescaped fragment: String) { sql += fragment }
    }
}

extension PostgresConnection {
    /// Runs `query` with its interpolated values bound (see `PostgresQuery`).
    @discardableResult
    public func query(bound query: PostgresQuery) throws(PostgresError) -> PostgresResult {
        try self.query(query.sql, query.parameters)
    }
}
