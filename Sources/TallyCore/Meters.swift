/// A meter: a named quantity an event can carry beside or instead of token counts (web searches,
/// tool calls, vector searches, images, audio milliseconds), aggregated per window by one of the
/// functions other metering systems offer (OpenMeter, Lago, Stripe billing meters): SUM, COUNT,
/// MAX, LATEST, or UNIQUE_COUNT of a property; grouped by the properties it declares dimensions.
///
/// Quantities are whole numbers of the meter's unit (declare a fine enough unit, such as
/// milliseconds, for fractions), so every aggregation is exact.
public struct MeterDefinition: Sendable, Hashable {
    public enum Aggregation: Sendable, Hashable {
        /// The sum of the readings' quantities.
        case sum
        /// The number of readings (quantities are not used).
        case count
        /// The largest quantity.
        case max
        /// The quantity of the latest reading by event time (log position breaks ties), so a
        /// replay or another batching gives the same answer.
        case latest
        /// The number of distinct values of one property (end users, runs).
        case uniqueCount(property: String)

        /// As the catalog and the windows' `aggregation` column spell it.
        public var name: String {
            switch self {
            case .sum: "sum"
            case .count: "count"
            case .max: "max"
            case .latest: "latest"
            case .uniqueCount: "unique_count"
            }
        }
    }

    /// `[a-z][a-z0-9_]*`, at most 64 characters.
    public let name: String
    /// What one unit is ("request", "image", "millisecond"); shown on invoices.
    public let unit: String
    public let aggregation: Aggregation
    /// Properties whose values split the meter's windows (`team`, `status`), in declared order.
    public let dimensions: [String]

    public init(name: String, unit: String, aggregation: Aggregation, dimensions: [String] = []) {
        self.name = name
        self.unit = unit
        self.aggregation = aggregation
        self.dimensions = dimensions
    }

    /// Meter and property names: lower-case letters, digits and underscores, starting with a
    /// letter, at most 64 characters (they become column values and query parameters).
    public static func isValidName(_ name: String) -> Bool {
        guard let first = name.utf8.first, (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(first), name.utf8.count <= 64 else { return false }
        return name.utf8.allSatisfy { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "_") }
    }
}

/// The meters a deployment declares, read from YAML or JSON:
///
///     meters:
///       - { name: web_search_requests, unit: request, aggregation: sum, dimensions: [team, status] }
///       - { name: active_end_users, unit: user, aggregation: unique_count, property: end_user }
///
/// Errors name the field (`meters[1].property`) and its line.
public struct MeterCatalog: Sendable, Equatable {
    public let meters: [String: MeterDefinition]

    /// At most this many dimensions per meter: each is a column of its windows.
    public static let maxDimensions = 8

    public init(_ meters: [MeterDefinition]) { self.meters = Dictionary(meters.map { ($0.name, $0) }) { first, _ in first } }

    public static func parse(_ text: String) throws(ConfigError) -> MeterCatalog {
        let root = try ConfigNode.parse(text)
        var fields = Fields(root, path: "")
        try fields.requireMap()
        guard let list = fields.take("meters"), case .list(let nodes) = list.value, !nodes.isEmpty else {
            throw ConfigError(line: root["meters"]?.line ?? root.line, path: "meters", message: "a non-empty list of meters is required")
        }
        try fields.rejectUnknown()
        var meters: [MeterDefinition] = []
        var names = Set<String>()
        for (index, node) in nodes.enumerated() {
            let meter = try parseMeter(node, path: "meters[\(index)]")
            guard names.insert(meter.name).inserted else {
                throw ConfigError(line: node.line, path: "meters[\(index)].name", message: "\"\(meter.name)\" is declared twice")
            }
            meters.append(meter)
        }
        return MeterCatalog(meters)
    }

    /// The catalog as JSON, meters sorted by name: what `tally meters apply` stores, and what
    /// `parse` reads back to an equal catalog.
    public var canonicalJSON: String {
        var json = JSONWriter()
        json.raw("{")
        json.key("meters", first: true); json.raw("[")
        for (index, meter) in meters.values.sorted(by: { $0.name < $1.name }).enumerated() {
            json.raw(index == 0 ? "\n  {" : ",\n  {")
            json.key("name", first: true); json.string(meter.name)
            json.key("unit"); json.string(meter.unit)
            json.key("aggregation"); json.string(meter.aggregation.name)
            if case .uniqueCount(let property) = meter.aggregation { json.key("property"); json.string(property) }
            if !meter.dimensions.isEmpty {
                json.key("dimensions"); json.raw("[")
                for (i, dimension) in meter.dimensions.enumerated() { if i > 0 { json.raw(",") }; json.string(dimension) }
                json.raw("]")
            }
            json.raw("}")
        }
        json.raw("\n]}\n")
        return String(decoding: json.bytes, as: UTF8.self)
    }

    /// Why this catalog cannot follow `previous`, or nil when it can. A declared meter is never
    /// changed or removed: its stored windows were folded with its aggregation and dimensions, and
    /// merging them with values of another kind would be meaningless (OpenMeter and Stripe also
    /// keep a meter's aggregation fixed). Declare a meter under a new name instead.
    public func refusal(following previous: MeterCatalog) -> String? {
        for (name, before) in previous.meters.sorted(by: { $0.key < $1.key }) {
            guard let now = meters[name] else { return "meter \(name) is missing: a declared meter stays declared" }
            if now.aggregation != before.aggregation || now.dimensions != before.dimensions {
                return "meter \(name) changes its aggregation or dimensions: declare a meter under a new name instead"
            }
        }
        return nil
    }

    private static func parseMeter(_ node: ConfigNode, path: String) throws(ConfigError) -> MeterDefinition {
        var fields = Fields(node, path: path)
        try fields.requireMap()
        func name(_ key: String) throws(ConfigError) -> String {
            guard let (text, at) = try fields.scalar(key) else { throw fields.error(at: node, key, "is required") }
            guard MeterDefinition.isValidName(text) else {
                throw fields.error(at: at, key, "\"\(text)\" is not a name: lower-case letters, digits and _, starting with a letter, at most 64")
            }
            return text
        }
        let meterName = try name("name")
        guard let unit = try fields.optionalLabel("unit") else { throw fields.error(at: node, "unit", "is required (e.g. request, image, millisecond)") }
        guard let (kind, kindNode) = try fields.scalar("aggregation") else {
            throw fields.error(at: node, "aggregation", "is required: sum, count, max, latest or unique_count")
        }
        let aggregation: MeterDefinition.Aggregation
        switch kind {
        case "sum": aggregation = .sum
        case "count": aggregation = .count
        case "max": aggregation = .max
        case "latest": aggregation = .latest
        case "unique_count": aggregation = .uniqueCount(property: try name("property"))
        default: throw fields.error(at: kindNode, "aggregation", "\"\(kind)\" is not one of sum, count, max, latest, unique_count")
        }
        var dimensions: [String] = []
        if let list = fields.take("dimensions") {
            guard case .list(let items) = list.value else { throw fields.error(at: list, "dimensions", "must be a list of property names") }
            for (index, item) in items.enumerated() {
                guard case .scalar(let text) = item.value, MeterDefinition.isValidName(text) else {
                    throw ConfigError(line: item.line, path: "\(path).dimensions[\(index)]", message: "must be a property name: lower-case letters, digits and _")
                }
                guard !dimensions.contains(text) else { throw ConfigError(line: item.line, path: "\(path).dimensions[\(index)]", message: "\"\(text)\" is named twice") }
                dimensions.append(text)
            }
            guard dimensions.count <= maxDimensions else { throw fields.error(at: list, "dimensions", "at most \(maxDimensions)") }
        }
        try fields.rejectUnknown()
        return MeterDefinition(name: meterName, unit: unit, aggregation: aggregation, dimensions: dimensions)
    }
}

/// One meter quantity of one counted event: what the meter windows fold.
public struct MeterReading: Sendable, Hashable {
    public let meter: String
    public let customerID: String
    /// Event time, microseconds since the Unix epoch (UTC).
    public let time: Int64
    public let position: LogPosition
    /// Whole units of the meter's unit, 0 or more.
    public let quantity: Int64
    public let properties: [String: String]

    public init(meter: String, customerID: String, time: Int64, position: LogPosition, quantity: Int64, properties: [String: String] = [:]) {
        self.meter = meter
        self.customerID = customerID
        self.time = time
        self.position = position
        self.quantity = quantity
        self.properties = properties
    }
}

extension MeterReading {
    /// The readings of one counted event, one per meter it carries. A dimension or unique-count
    /// property may name one of the event's labels (`model`, `provider`, `feature`,
    /// `environment`) as well as a property; the label wins over a property of the same name.
    public static func of(_ positioned: PositionedEvent) -> [MeterReading] {
        let event = positioned.event
        guard !event.meters.isEmpty else { return [] }
        var properties = event.properties
        if event.isModelCall { properties["model"] = event.model }
        if let provider = event.provider { properties["provider"] = provider }
        if let feature = event.feature { properties["feature"] = feature }
        if let environment = event.environment { properties["environment"] = environment }
        return event.meters.sorted(by: { $0.key < $1.key }).map { meter, quantity in
            MeterReading(meter: meter, customerID: event.subject, time: event.time.microseconds, position: positioned.position,
                         quantity: quantity, properties: properties)
        }
    }
}

/// A meter's window: one meter, one customer, one granularity and start, one value per declared
/// dimension (empty when the reading lacks the property). Texts compare byte for byte, as
/// PostgreSQL keys them (`ExactText`).
public struct MeterWindowKey: Sendable, Hashable {
    public let meter: String
    public let customerID: String
    public let granularity: Granularity
    /// Microseconds since the Unix epoch (UTC) of the window's first instant.
    public let start: Int64
    public let dimensions: [String]
    /// Hashed once: the aggregator looks a reading's window up several times (its batch's
    /// windows, the stored unique values), and hashing the texts each time cost more than the rest.
    private let hashCode: Int

    public init(meter: String, customerID: String, granularity: Granularity, start: Int64, dimensions: [String]) {
        self.meter = meter
        self.customerID = customerID
        self.granularity = granularity
        self.start = start
        self.dimensions = dimensions
        var hasher = Hasher()
        hasher.combine(granularity)
        hasher.combine(start)
        ExactText.hash(meter, into: &hasher)
        ExactText.hash(customerID, into: &hasher)
        for text in dimensions { ExactText.hash(text, into: &hasher) }
        hashCode = hasher.finalize()
    }

    public static func == (a: MeterWindowKey, b: MeterWindowKey) -> Bool {
        a.hashCode == b.hashCode && a.granularity == b.granularity && a.start == b.start && ExactText.equal(a.meter, b.meter)
            && ExactText.equal(a.customerID, b.customerID) && a.dimensions.count == b.dimensions.count
            && zip(a.dimensions, b.dimensions).allSatisfy(ExactText.equal)
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(hashCode) }
}

/// What a meter's window holds so far. Merging is associative and commutative, so the windows
/// of a stream are the same however it is split into batches and in whatever order batches of
/// different customers or partitions are merged (`MeterWindowTests`).
public enum MeterWindowValue: Sendable, Equatable {
    case sum(Int128)
    case count(Int128)
    case max(Int64)
    case latest(time: Int64, position: LogPosition, quantity: Int64)
    /// The distinct values themselves (byte for byte): a day's or month's count is that of the
    /// union, never a sum of the hours' counts.
    case unique(Set<ExactText>)

    /// The window's figure.
    public var result: Int128 {
        switch self {
        case .sum(let value), .count(let value): value
        case .max(let value): Int128(value)
        case .latest(_, _, let quantity): Int128(quantity)
        case .unique(let values): Int128(values.count)
        }
    }

    /// The value of one reading; nil when it adds nothing (a unique count's property is absent).
    static func of(_ reading: MeterReading, _ aggregation: MeterDefinition.Aggregation) -> MeterWindowValue? {
        switch aggregation {
        case .sum: .sum(Int128(reading.quantity))
        case .count: .count(1)
        case .max: .max(reading.quantity)
        case .latest: .latest(time: reading.time, position: reading.position, quantity: reading.quantity)
        case .uniqueCount(let property): reading.properties[property].map { .unique([ExactText($0)]) }
        }
    }

    /// Both values together; values of different aggregations never share a window.
    public func merged(with other: MeterWindowValue) -> MeterWindowValue {
        switch (self, other) {
        case (.sum(let a), .sum(let b)): .sum(a + b)
        case (.count(let a), .count(let b)): .count(a + b)
        case (.max(let a), .max(let b)): .max(Swift.max(a, b))
        case (.latest(let t1, let p1, _), .latest(let t2, let p2, _)): (t1, p1) >= (t2, p2) ? self : other
        case (.unique(let a), .unique(let b)): .unique(a.union(b))
        // Never met: a catalog cannot change a declared meter's aggregation (`refusal(following:)`).
        default: preconditionFailure("meter windows of different aggregations: \(self), \(other)")
        }
    }
}

public enum MeterWindows {
    /// The windows `readings` touch at every granularity, each folded from the readings
    /// themselves: a day's MAX, LATEST and UNIQUE_COUNT are the day's, not made of its hours.
    /// Readings of meters the catalog does not declare are left out (the API refuses them).
    /// `granularities` selects the windows made: the aggregator stores hours only (its view
    /// derives days and months from them exactly).
    public static func fold(_ readings: [MeterReading], catalog: MeterCatalog,
                            granularities: [Granularity] = Granularity.allCases) -> [MeterWindowKey: MeterWindowValue] {
        var windows: [MeterWindowKey: MeterWindowValue] = [:]
        for reading in readings {
            guard let meter = catalog.meters[reading.meter], let value = MeterWindowValue.of(reading, meter.aggregation) else { continue }
            let dimensions = meter.dimensions.map { reading.properties[$0] ?? "" }
            for granularity in granularities {
                let key = MeterWindowKey(meter: meter.name, customerID: reading.customerID, granularity: granularity,
                                         start: granularity.windowStart(reading.time), dimensions: dimensions)
                windows[key] = windows[key].map { $0.merged(with: value) } ?? value
            }
        }
        return windows
    }

    /// The hourly windows of counted events' meters: what `fold` makes of `MeterReading.of` of
    /// each event (`MeterWindowTests` checks they agree), without a reading or a copy of the
    /// properties per meter, and adding to each window in place: the aggregator's hot path.
    /// Also answers the readings of meters the catalog does not declare, with their event ids.
    public static func foldHours(_ events: [PositionedEvent], catalog: MeterCatalog)
        -> (windows: [MeterWindowKey: MeterWindowValue], undeclared: [(reading: MeterReading, eventID: String)]) {
        var sums: [MeterWindowKey: Int128] = [:]
        var maxima: [MeterWindowKey: Int64] = [:]
        var latest: [MeterWindowKey: (time: Int64, position: LogPosition, quantity: Int64)] = [:]
        var uniques: [MeterWindowKey: Set<ExactText>] = [:]
        var undeclared: [(reading: MeterReading, eventID: String)] = []
        for positioned in events {
            let event = positioned.event
            guard !event.meters.isEmpty else { continue }
            let start = Granularity.hour.windowStart(event.time.microseconds)
            // As `MeterReading.of`: the event's labels win over properties of the same name.
            let value = event.dimension
            var sawUndeclared = false
            for (name, quantity) in event.meters {
                guard let meter = catalog.meters[name] else {
                    sawUndeclared = true
                    continue
                }
                let key = MeterWindowKey(meter: name, customerID: event.subject, granularity: .hour, start: start,
                                         dimensions: meter.dimensions.map { value($0) ?? "" })
                switch meter.aggregation {
                case .sum: sums[key, default: 0] += Int128(quantity)
                case .count: sums[key, default: 0] += 1
                case .max: maxima[key] = Swift.max(maxima[key] ?? quantity, quantity)
                case .latest:
                    if let stored = latest[key], (stored.time, stored.position) >= (event.time.microseconds, positioned.position) { continue }
                    latest[key] = (event.time.microseconds, positioned.position, quantity)
                case .uniqueCount(let property):
                    if let distinct = value(property) { uniques[key, default: []].insert(ExactText(distinct)) }
                }
            }
            if sawUndeclared {
                for reading in MeterReading.of(positioned) where catalog.meters[reading.meter] == nil { undeclared.append((reading, event.id)) }
            }
        }
        var windows: [MeterWindowKey: MeterWindowValue] = [:]
        windows.reserveCapacity(sums.count + maxima.count + latest.count + uniques.count)
        for (key, sum) in sums { windows[key] = catalog.meters[key.meter]?.aggregation == .count ? .count(sum) : .sum(sum) }
        for (key, maximum) in maxima { windows[key] = .max(maximum) }
        for (key, last) in latest { windows[key] = .latest(time: last.time, position: last.position, quantity: last.quantity) }
        for (key, values) in uniques { windows[key] = .unique(values) }
        return (windows, undeclared)
    }

    /// Adds `other`'s windows to `windows` (a batch's to what was stored).
    public static func merge(_ other: [MeterWindowKey: MeterWindowValue], into windows: inout [MeterWindowKey: MeterWindowValue]) {
        windows.merge(other) { $0.merged(with: $1) }
    }

    /// A window's dimension values as a JSON object of the meter's dimension names (the
    /// `dimensions` column): `{"status":"error","team":"search"}`.
    public static func dimensionsJSON(_ key: MeterWindowKey, _ meter: MeterDefinition) -> String {
        var json = JSONWriter(capacity: 64)
        json.raw("{")
        for (index, (name, value)) in zip(meter.dimensions, key.dimensions).enumerated() {
            json.key(name, first: index == 0); json.string(value)
        }
        json.raw("}")
        return String(decoding: json.bytes, as: UTF8.self)
    }
}
