/// Price book files (YAML or JSON) to `PriceBook`s and back to canonical JSON.
///
/// ```yaml
/// book: default                 # plan name; "default" unless given
/// customer: acme                # optional: an override for one customer
/// effective_from: 2026-01-01T00:00:00Z
/// currency: USD
/// unit: per_1m_tokens           # or per_token
/// minimum_per_period: "20.00"   # optional
/// models:
///   - model: gpt-4o
///     aliases: [gpt-4o-2024-08-06, "openai/gpt-4o-*"]
///     input: "2.50"
///     output: "10.00"
///     cache_read: "1.25"
///   - model: big-model
///     input: { graduated: [{ up_to: 1000000, price: "3.00" }, { price: "2.50" }] }
///     output: { package: { size: 1000, price: "0.02" } }
///   - model: gemini-2.5-pro
///     input: "1.25"
///     output: "10.00"
///     context_tiers:              # a request with more input tokens is priced whole at these
///       - { above_input_tokens: 200000, input: "2.50", output: "15.00" }
///     rules:                      # prices for calls with given dimensions (PriceRule)
///       - rule: batch
///         when: { batch: "true" } # a label or property → a value or a list of values
///         input: "0.625"
///         output: "5.00"
///         context_tiers: [{ above_input_tokens: 200000, input: "1.25", output: "7.50" }]
/// meters:                         # optional: prices per unit of a meter (tally meters apply)
///   - { meter: vector_searches, price: "0.002" }
///   - { meter: web_search_requests, price: { package: { size: 1000, price: "10.00" } } }
///   - { meter: images, price: "0.04", rules: [{ rule: hd, when: { quality: hd }, price: "0.08" }] }
/// ```
///
/// A rule's token prices replace the model's for the types it names; it has only its own context
/// tiers (required when the model has some; a rule naming no price keeps the model's prices and
/// tiers). Which prices a call gets: docs/pricing.md, "Price rules".
///
/// Token types: `input`, `output`, `cache_read`, `cache_write` (5-minute writes, or all writes
/// when there is no `cache_write_1h`), `cache_write_1h`, `reasoning`.
public enum PriceBookDocument {
    public static func parse(_ text: String) throws(ConfigError) -> PriceBook {
        try parse(ConfigNode.parse(text))
    }

    public static func parse(_ root: ConfigNode) throws(ConfigError) -> PriceBook {
        var fields = Fields(root, path: "")
        try fields.requireMap()
        let name = try fields.optionalLabel("book") ?? "default"
        let customerID = try fields.optionalLabel("customer")
        let effectiveFrom = try fields.time("effective_from")
        let currency = try fields.currency("currency")
        let unit = try fields.unit("unit") ?? .perMillion
        let minimum = try fields.optionalMoney("minimum_per_period")
        let modelsNode = fields.take("models")
        let metersNode = fields.take("meters")
        var modelNodes: [ConfigNode] = []
        if let modelsNode {
            guard case .list(let nodes) = modelsNode.value else { throw ConfigError(line: modelsNode.line, path: "models", message: "must be a list of models") }
            modelNodes = nodes
        }
        var meters: [MeterPrice] = []
        if let metersNode {
            guard case .list(let nodes) = metersNode.value else {
                throw ConfigError(line: metersNode.line, path: "meters", message: "must be a list of { meter, price }")
            }
            for (index, node) in nodes.enumerated() {
                let price = try parseMeterPrice(node, path: "meters[\(index)]")
                guard !meters.contains(where: { $0.meter == price.meter }) else {
                    throw ConfigError(line: node.line, path: "meters[\(index)].meter", message: "\"\(price.meter)\" is priced twice in this book")
                }
                meters.append(price)
            }
        }
        guard !modelNodes.isEmpty || !meters.isEmpty else {
            throw ConfigError(line: root["models"]?.line ?? root.line, path: "models", message: "a non-empty list of models (or of meters) is required")
        }
        try fields.rejectUnknown()
        var models: [ModelPrices] = []
        var names = Set<String>()
        for (index, node) in modelNodes.enumerated() {
            let model = try parseModel(node, path: "models[\(index)]", unit: unit)
            for name in [model.model] + model.aliases {
                guard names.insert(name).inserted else {
                    throw ConfigError(line: node.line, path: "models[\(index)]", message: "\"\(name)\" is named twice in this book")
                }
            }
            models.append(model)
        }
        return PriceBook(name: name, customerID: customerID, effectiveFrom: effectiveFrom, currency: currency,
                         minimumPerPeriodNanos: minimum, models: models, meters: meters)
    }

    /// `{ meter, price }`: the price is per unit of the meter, in any pricing model.
    private static func parseMeterPrice(_ node: ConfigNode, path: String) throws(ConfigError) -> MeterPrice {
        var fields = Fields(node, path: path)
        try fields.requireMap()
        guard let (meter, at) = try fields.scalar("meter") else { throw fields.error(at: node, "meter", "is required") }
        guard MeterDefinition.isValidName(meter) else { throw fields.error(at: at, "meter", "\"\(meter)\" is not a meter name") }
        guard let priceNode = fields.take("price") else { throw fields.error(at: node, "price", "is required (per unit of the meter)") }
        let pricing = try parsePrice(priceNode, path: "\(path).price", unit: .perToken)
        let rules = try parseRules(fields.take("rules"), path: path) { (fields: inout Fields, rulePath: String, ruleNode: ConfigNode) throws(ConfigError) in
            guard let node = fields.take("price") else { throw fields.error(at: ruleNode, "price", "is required (per unit of the meter)") }
            return try parsePrice(node, path: "\(rulePath).price", unit: .perToken)
        }
        try fields.rejectUnknown()
        return MeterPrice(meter: meter, pricing: pricing, rules: rules)
    }

    private static func parseModel(_ node: ConfigNode, path: String, unit: PriceUnit) throws(ConfigError) -> ModelPrices {
        var fields = Fields(node, path: path)
        try fields.requireMap()
        guard let model = try fields.optionalLabel("model") else { throw fields.error(at: node, "model", "is required") }
        var aliases: [String] = []
        if let aliasNode = fields.take("aliases") {
            guard case .list(let items) = aliasNode.value else { throw fields.error(at: aliasNode, "aliases", "must be a list of model ids") }
            for (index, item) in items.enumerated() {
                guard case .scalar(let alias) = item.value, !alias.isEmpty else {
                    throw fields.error(at: item, "aliases[\(index)]", "must be a model id")
                }
                aliases.append(alias)
            }
        }
        let modelUnit = try fields.unit("unit") ?? unit
        let prices = try parsePrices(&fields, path: path, unit: modelUnit)
        let tiers = try parseContextTiers(&fields, path: path, unit: modelUnit, allowEmpty: false) ?? []
        let rulesNode = fields.take("rules")
        try fields.rejectUnknown()
        for required in [TokenType.input, .output] where prices[required] == nil {
            throw ConfigError(line: node.line, path: "\(path).\(required.rawValue)", message: "is required (a price per token type)")
        }
        let base = ModelPrices(model: model, aliases: aliases, prices: prices, contextTiers: tiers)
        let rules = try parseRules(rulesNode, path: path) { (fields: inout Fields, rulePath: String, ruleNode: ConfigNode) throws(ConfigError) in
            let named = try parsePrices(&fields, path: rulePath, unit: modelUnit)
            let ownTiers = try parseContextTiers(&fields, path: rulePath, unit: modelUnit, allowEmpty: true)
            // A rule that names no price splits its calls onto lines of their own at the model's
            // prices, tiers included. One that does must say which context tiers it keeps: the
            // model's are priced for the base rates, not the rule's (a batch discount above 200k).
            if named.isEmpty && ownTiers == nil { return base.withoutAliases }
            if ownTiers == nil && !tiers.isEmpty {
                throw ConfigError(line: ruleNode.line, path: "\(rulePath).context_tiers",
                                  message: "is required: \(model) has context tiers; give this rule's own (or [] for none)")
            }
            return ModelPrices(model: model, prices: prices.merging(named) { $1 }, contextTiers: ownTiers ?? [])
        }
        return ModelPrices(model: model, aliases: aliases, prices: prices, contextTiers: tiers, rules: rules)
    }

    /// `context_tiers: [{ above_input_tokens, <prices> }]`; nil when absent.
    private static func parseContextTiers(_ fields: inout Fields, path: String, unit: PriceUnit, allowEmpty: Bool) throws(ConfigError) -> [ContextTier]? {
        guard let tiersNode = fields.take("context_tiers") else { return nil }
        guard case .list(let items) = tiersNode.value, allowEmpty || !items.isEmpty else {
            throw fields.error(at: tiersNode, "context_tiers", "must be a list of { above_input_tokens, prices }")
        }
        var tiers: [ContextTier] = []
        for (index, item) in items.enumerated() {
            let tierPath = "\(path).context_tiers[\(index)]"
            var tierFields = Fields(item, path: tierPath)
            try tierFields.requireMap()
            let above = try tierFields.positiveInteger("above_input_tokens")
            let tierPrices = try parsePrices(&tierFields, path: tierPath, unit: unit)
            try tierFields.rejectUnknown()
            guard !tierPrices.isEmpty else { throw ConfigError(line: item.line, path: tierPath, message: "names no price") }
            guard !tiers.contains(where: { $0.aboveInputTokens == above }) else {
                throw ConfigError(line: item.line, path: "\(tierPath).above_input_tokens", message: "\(above) is given twice")
            }
            tiers.append(ContextTier(aboveInputTokens: above, prices: tierPrices))
        }
        return tiers
    }

    /// `rules: [{ rule, when: { dimension: value or [values] }, <prices> }]`, the prices read by `prices`.
    private static func parseRules<Prices>(_ node: ConfigNode?, path: String,
                                           prices: (inout Fields, String, ConfigNode) throws(ConfigError) -> Prices) throws(ConfigError) -> [PriceRule<Prices>] {
        guard let node else { return [] }
        guard case .list(let items) = node.value, !items.isEmpty else {
            throw ConfigError(line: node.line, path: "\(path).rules", message: "must be a list of { rule, when, prices }")
        }
        var rules: [PriceRule<Prices>] = []
        for (index, item) in items.enumerated() {
            let rulePath = "\(path).rules[\(index)]"
            var fields = Fields(item, path: rulePath)
            try fields.requireMap()
            guard let name = try fields.optionalLabel("rule") else { throw fields.error(at: item, "rule", "is required (a name, shown on invoice lines)") }
            guard !rules.contains(where: { $0.name == name }) else { throw fields.error(at: item, "rule", "\"\(name)\" is named twice") }
            guard let whenNode = fields.take("when") else {
                throw fields.error(at: item, "when", "is required: a map of dimension to value (or list of values), e.g. { feature: summarize }")
            }
            let conditions = try parseConditions(whenNode, path: "\(rulePath).when")
            let rulePrices = try prices(&fields, rulePath, item)
            try fields.rejectUnknown()
            rules.append(PriceRule(name: name, conditions: conditions, prices: rulePrices))
        }
        return rules
    }

    /// `{ feature: summarize, service_tier: [priority, scale] }`, sorted by dimension.
    private static func parseConditions(_ node: ConfigNode, path: String) throws(ConfigError) -> [PriceCondition] {
        guard case .map(let entries) = node.value, !entries.isEmpty else {
            throw ConfigError(line: node.line, path: path, message: "must be a non-empty map of dimension to value (or list of values)")
        }
        var conditions: [PriceCondition] = []
        for (dimension, valueNode) in entries {
            let conditionPath = "\(path).\(dimension)"
            guard !dimension.isEmpty, dimension.utf8.count <= 256, !dimension.utf8.contains(where: { $0 < 0x20 }) else {
                throw ConfigError(line: valueNode.line, path: conditionPath, message: "a dimension is 1 to 256 characters without control characters")
            }
            guard dimension != "model" else {
                throw ConfigError(line: valueNode.line, path: conditionPath, message: "the entry's model decides the model: give the other model an entry of its own")
            }
            var values: [String] = []
            let items: [ConfigNode]
            if case .list(let list) = valueNode.value { items = list } else { items = [valueNode] }
            for item in items {
                guard case .scalar(let value) = item.value, value.utf8.count <= 256 else {
                    throw ConfigError(line: item.line, path: conditionPath, message: "must be a value of at most 256 bytes, or a non-empty list of them")
                }
                values.append(value)
            }
            guard !values.isEmpty else { throw ConfigError(line: valueNode.line, path: conditionPath, message: "must name at least one value") }
            conditions.append(PriceCondition(dimension: dimension, values: values))
        }
        return conditions.sorted { $0.dimension < $1.dimension }
    }

    /// The prices a map names, one per token type.
    private static func parsePrices(_ fields: inout Fields, path: String, unit: PriceUnit) throws(ConfigError) -> [TokenType: PricingModel] {
        var prices: [TokenType: PricingModel] = [:]
        for type in TokenType.tokens {
            if let priceNode = fields.take(type.rawValue) {
                prices[type] = try parsePrice(priceNode, path: "\(path).\(type.rawValue)", unit: unit)
            }
        }
        return prices
    }

    private static func parsePrice(_ node: ConfigNode, path: String, unit: PriceUnit) throws(ConfigError) -> PricingModel {
        if case .scalar(let text) = node.value {
            return .perUnit(try rate(text, node: node, path: path, unit: unit))
        }
        var fields = Fields(node, path: path)
        try fields.requireMap()
        guard fields.remaining.count == 1, let kind = fields.remaining.first else {
            throw ConfigError(line: node.line, path: path, message: "must be a price, or one of per_unit, package, graduated, volume")
        }
        let body = fields.take(kind)!
        switch kind {
        case "per_unit":
            guard case .scalar(let text) = body.value else { throw ConfigError(line: body.line, path: "\(path).per_unit", message: "must be a decimal price") }
            return .perUnit(try rate(text, node: body, path: "\(path).per_unit", unit: unit))
        case "package":
            var package = Fields(body, path: "\(path).package")
            try package.requireMap()
            let size = try package.positiveInteger("size")
            guard let price = try package.optionalMoney("price") else { throw package.error(at: body, "price", "is required") }
            try package.rejectUnknown()
            return .package(size: size, priceNanos: price)
        case "graduated", "volume":
            let tiers = try parseTiers(body, path: "\(path).\(kind)", unit: unit)
            return kind == "graduated" ? .graduated(tiers) : .volume(tiers)
        default:
            throw ConfigError(line: body.line, path: "\(path).\(kind)", message: "unknown pricing model; use per_unit, package, graduated or volume")
        }
    }

    private static func parseTiers(_ node: ConfigNode, path: String, unit: PriceUnit) throws(ConfigError) -> [PriceTier] {
        guard case .list(let items) = node.value, !items.isEmpty else {
            throw ConfigError(line: node.line, path: path, message: "must be a non-empty list of tiers")
        }
        var tiers: [PriceTier] = []
        for (index, item) in items.enumerated() {
            let tierPath = "\(path)[\(index)]"
            var fields = Fields(item, path: tierPath)
            try fields.requireMap()
            let isLast = index == items.count - 1
            var upTo: Int64?
            if fields.has("up_to") {
                upTo = try fields.positiveInteger("up_to")
                if isLast { throw ConfigError(line: item.line, path: "\(tierPath).up_to", message: "the last tier has no upper bound") }
                if let previous = tiers.last?.upTo, upTo! <= previous {
                    throw ConfigError(line: item.line, path: "\(tierPath).up_to", message: "must be above the previous tier's \(previous)")
                }
            } else if !isLast {
                throw ConfigError(line: item.line, path: "\(tierPath).up_to", message: "is required on every tier but the last")
            }
            guard let priceNode = fields.take("price"), case .scalar(let text) = priceNode.value else {
                throw ConfigError(line: item.line, path: "\(tierPath).price", message: "is required")
            }
            let tierRate = try rate(text, node: priceNode, path: "\(tierPath).price", unit: unit)
            try fields.rejectUnknown()
            tiers.append(PriceTier(upTo: upTo, rate: tierRate))
        }
        return tiers
    }

    private static func rate(_ text: String, node: ConfigNode, path: String, unit: PriceUnit) throws(ConfigError) -> TokenRate {
        guard let rate = TokenRate.parse(text, perTokens: unit) else {
            throw ConfigError(line: node.line, path: path, message: "\"\(text)\" is not a price: a non-negative decimal with at most \(unit == .perToken ? 15 : 9) decimals per \(unit == .perToken ? "token" : "1M tokens")")
        }
        return rate
    }

    /// Canonical JSON of a book (prices per 1M tokens, exact), as stored and shown.
    public static func canonicalJSON(_ book: PriceBook) -> String {
        var json = JSONWriter()
        json.raw("{")
        json.key("book", first: true); json.string(book.name)
        if let customer = book.customerID { json.key("customer"); json.string(customer) }
        json.key("effective_from"); json.string(book.effectiveFrom.text)
        json.key("currency"); json.string(book.currency.code)
        json.key("unit"); json.string(PriceUnit.perMillion.rawValue)
        if let minimum = book.minimumPerPeriodNanos { json.key("minimum_per_period"); json.string(Money.format(nanos: minimum)) }
        json.key("models"); json.raw("[")
        for (index, model) in book.models.enumerated() {
            json.raw(index == 0 ? "\n  {" : ",\n  {")
            json.key("model", first: true); json.string(model.model)
            if !model.aliases.isEmpty {
                json.key("aliases"); json.raw("[")
                for (i, alias) in model.aliases.enumerated() { if i > 0 { json.raw(",") }; json.string(alias) }
                json.raw("]")
            }
            write(model.prices, to: &json)
            if !model.contextTiers.isEmpty { write(model.contextTiers, to: &json) }
            if !model.rules.isEmpty {
                write(model.rules, to: &json) { rule, json in
                    // The twin of the parser: a rule with the model's prices and tiers names neither.
                    guard rule.prices != model.withoutAliases else { return }
                    write(rule.prices.prices.filter { model.prices[$0.key] != $0.value }, to: &json)
                    write(rule.prices.contextTiers, to: &json)
                }
            }
            json.raw("}")
        }
        json.raw(book.models.isEmpty ? "]" : "\n]")
        if !book.meters.isEmpty {
            json.key("meters"); json.raw("[")
            for (index, price) in book.meters.enumerated() {
                json.raw(index == 0 ? "\n  {" : ",\n  {")
                json.key("meter", first: true); json.string(price.meter)
                json.key("price"); write(price.pricing, to: &json, perUnit: true)
                if !price.rules.isEmpty {
                    write(price.rules, to: &json) { rule, json in json.key("price"); write(rule.prices, to: &json, perUnit: true) }
                }
                json.raw("}")
            }
            json.raw("\n]")
        }
        json.raw("}\n")
        return String(decoding: json.bytes, as: UTF8.self)
    }

    private static func write(_ tiers: [ContextTier], to json: inout JSONWriter) {
        json.key("context_tiers"); json.raw("[")
        for (i, tier) in tiers.enumerated() {
            json.raw(i == 0 ? "{" : ",{")
            json.key("above_input_tokens", first: true); json.integer(tier.aboveInputTokens)
            write(tier.prices, to: &json)
            json.raw("}")
        }
        json.raw("]")
    }

    /// `"rules":[{"rule","when",…}]`, each rule's prices written by `prices`.
    private static func write<Prices>(_ rules: [PriceRule<Prices>], to json: inout JSONWriter, prices: (PriceRule<Prices>, inout JSONWriter) -> Void) {
        json.key("rules"); json.raw("[")
        for (index, rule) in rules.enumerated() {
            json.raw(index == 0 ? "{" : ",{")
            json.key("rule", first: true); json.string(rule.name)
            json.key("when"); json.raw("{")
            for (i, condition) in rule.conditions.enumerated() {
                json.key(condition.dimension, first: i == 0)
                json.raw("[")
                for (j, value) in condition.values.enumerated() { if j > 0 { json.raw(",") }; json.string(value) }
                json.raw("]")
            }
            json.raw("}")
            prices(rule, &json)
            json.raw("}")
        }
        json.raw("]")
    }

    /// One member per priced token type, in `TokenType` order (the twin of `parsePrices`).
    private static func write(_ prices: [TokenType: PricingModel], to json: inout JSONWriter) {
        for type in TokenType.tokens {
            guard let price = prices[type] else { continue }
            json.key(type.rawValue)
            write(price, to: &json)
        }
    }

    /// `perUnit`: a meter's price, written per unit (read back with `PriceUnit.perToken`).
    private static func write(_ price: PricingModel, to json: inout JSONWriter, perUnit: Bool = false) {
        let text = { (rate: TokenRate) in perUnit ? rate.perUnitText : rate.perMillionText }
        func tiers(_ list: [PriceTier]) {
            json.raw("[")
            for (index, tier) in list.enumerated() {
                json.raw(index == 0 ? "{" : ",{")
                if let upTo = tier.upTo { json.key("up_to", first: true); json.integer(upTo); json.key("price") } else { json.key("price", first: true) }
                json.string(text(tier.rate))
                json.raw("}")
            }
            json.raw("]")
        }
        switch price {
        case .perUnit(let rate): json.string(text(rate))
        case .package(let size, let nanos):
            json.raw("{\"package\":{\"size\":\(size),\"price\":"); json.string(Money.format(nanos: nanos)); json.raw("}}")
        case .graduated(let list): json.raw("{\"graduated\":"); tiers(list); json.raw("}")
        case .volume(let list): json.raw("{\"volume\":"); tiers(list); json.raw("}")
        }
    }

    /// What an import of LiteLLM's prices made, and what it left out, per model, with why.
    public struct LiteLLMImport: Sendable {
        public let book: PriceBook
        /// Models not in the book: model → reason.
        public let skipped: [(model: String, reason: String)]
        /// Models in the book with prices it could not carry: model → the fields and why.
        public let unmapped: [(model: String, reason: String)]
    }

    /// LiteLLM's per-token cost fields and the token types they price.
    private static let liteLLMFields: [String: TokenType] = [
        "input_cost_per_token": .input, "output_cost_per_token": .output,
        "cache_read_input_token_cost": .cacheRead, "cache_creation_input_token_cost": .cacheWrite,
        "cache_creation_input_token_cost_above_1hr": .cacheWrite1h, "output_cost_per_reasoning_token": .reasoning,
    ]

    /// LiteLLM's cost suffixes for the batch API and OpenAI's service tiers, and the rules they become.
    private static let liteLLMRules: [(suffix: String, name: String, condition: PriceCondition)] = [
        ("_batches", "batch", PriceCondition(dimension: StandardProperty.batch, values: ["true"])),
        ("_priority", "priority", PriceCondition(dimension: StandardProperty.serviceTier, values: ["priority"])),
        ("_flex", "flex", PriceCondition(dimension: StandardProperty.serviceTier, values: ["flex"])),
    ]

    /// `"input_cost_per_token_above_200k_tokens"` → (`"input_cost_per_token"`, 200,000); other names → (name, 0).
    public static func contextTier(of field: String) -> (base: String, above: Int64) {
        let parts = field.split(separator: "_", omittingEmptySubsequences: false)
        guard parts.count >= 4, parts[parts.count - 1] == "tokens", parts[parts.count - 3] == "above",
              parts[parts.count - 2].hasSuffix("k"), let thousands = Int64(parts[parts.count - 2].dropLast()),
              thousands > 0, thousands < 1_000_000_000 else { return (field, 0) }
        return (parts.dropLast(3).joined(separator: "_"), thousands * 1_000)
    }

    /// Turns LiteLLM's `model_prices_and_context_window.json` into a price book: every entry with
    /// per-token input and output costs, parsed exactly from their JSON text (e.g. `3e-06`,
    /// `1.1428571428571428e-06`), `*_above_<N>k_tokens` costs as context tiers (a request with more
    /// than N × 1,000 input tokens is priced whole at them), 1-hour cache writes, and the costs of
    /// the batch API and OpenAI's service tiers (`*_batches`, `*_priority`, `*_flex`) as the price
    /// rules `batch` (when `batch` is `"true"`), `priority` and `flex` (when `service_tier` is so).
    ///
    /// Linear in the file's size. A model whose prices cannot be read is skipped with its reason,
    /// never the whole import; cost fields Tally cannot bill (per image, second, character or
    /// query), and a rule whose prices do not cover the model's context tiers, are listed per model.
    /// - Throws: `ConfigError` when the file is not JSON or not an object of models.
    public static func importLiteLLM(_ text: String, name: String, effectiveFrom: EventTime, currency: Currency) throws(ConfigError) -> LiteLLMImport {
        let root = try ConfigNode.parseJSON(text)
        guard case .map(let entries) = root.value else { throw ConfigError(line: root.line, path: "", message: "expected an object of models") }
        var models: [ModelPrices] = []
        var skipped: [(model: String, reason: String)] = []
        var unmapped: [(model: String, reason: String)] = []
        for (model, entry) in entries.sorted(by: { $0.key < $1.key }) where model != "sample_spec" {
            guard case .map(let members) = entry.value else {
                skipped.append((model, "line \(entry.line): not an object of fields"))
                continue
            }
            var prices: [TokenType: PricingModel] = [:]
            var tiers: [Int64: [TokenType: PricingModel]] = [:]
            // Per rule (index into `liteLLMRules`), per context tier (0: none), per token type.
            var rulePrices: [Int: [Int64: [TokenType: PricingModel]]] = [:]
            var notBilled: [String] = []
            var problem: String?
            for (field, node) in members where field.contains("cost") {
                let rule = liteLLMRules.firstIndex { field.hasSuffix($0.suffix) }
                let (base, above) = contextTier(of: rule.map { String(field.dropLast(liteLLMRules[$0].suffix.count)) } ?? field)
                guard let type = liteLLMFields[base] else {
                    // Zero costs bill nothing: only costs that would be owed are worth a line.
                    if case .scalar(let value) = node.value, let number = ExactDecimal(value), number.significand == 0 { continue }
                    notBilled.append(field)
                    continue
                }
                guard case .scalar(let value) = node.value, let rate = TokenRate.parse(value, perTokens: .perToken) else {
                    problem = "line \(node.line): \(field) is not an exact non-negative price of at most 24 decimals per token"
                    break
                }
                if let rule {
                    rulePrices[rule, default: [:]][above, default: [:]][type] = .perUnit(rate)
                } else if above == 0 {
                    prices[type] = .perUnit(rate)
                } else {
                    tiers[above, default: [:]][type] = .perUnit(rate)
                }
            }
            if let problem {
                skipped.append((model, problem))
                continue
            }
            guard prices[.input] != nil, prices[.output] != nil else {
                let priced = members.map(\.key).filter { $0.contains("cost") }.sorted()
                skipped.append((model, priced.isEmpty ? "no costs" : "no per-token input and output costs (has \(priced.joined(separator: ", ")))"))
                continue
            }
            if !notBilled.isEmpty { unmapped.append((model, "not billed by token: \(notBilled.sorted().joined(separator: ", "))")) }
            var rules: [PriceRule<ModelPrices>] = []
            for (index, byTier) in rulePrices.sorted(by: { $0.key < $1.key }) {
                let rule = liteLLMRules[index]
                // A rule has only its own context tiers: one without a price for each token type
                // the model prices in a tier would bill long requests at the rule's base rates, so
                // it is left out, and said.
                let missing = tiers.filter { above, prices in !Set(prices.keys).isSubset(of: byTier[above]?.keys ?? [:].keys) }.keys.sorted()
                guard missing.isEmpty else {
                    unmapped.append((model, "rule \(rule.name) left out: its \(rule.suffix.dropFirst()) prices above "
                        + "\(missing.map(String.init).joined(separator: ", ")) input tokens do not cover the model's token types there"))
                    continue
                }
                rules.append(PriceRule(name: rule.name, conditions: [rule.condition], prices: ModelPrices(
                    model: model, prices: prices.merging(byTier[0] ?? [:]) { $1 },
                    contextTiers: byTier.filter { $0.key > 0 }.map { ContextTier(aboveInputTokens: $0.key, prices: $0.value) })))
            }
            models.append(ModelPrices(model: model, prices: prices,
                                      contextTiers: tiers.map { ContextTier(aboveInputTokens: $0.key, prices: $0.value) }, rules: rules))
        }
        guard !models.isEmpty else { throw ConfigError(line: root.line, path: "", message: "no model has input and output per-token costs") }
        return LiteLLMImport(book: PriceBook(name: name, effectiveFrom: effectiveFrom, currency: currency, models: models),
                             skipped: skipped, unmapped: unmapped)
    }
}

/// Reads the members of one map, remembering which were used so unknown ones are reported
/// (price books and meter catalogs).
struct Fields {
    let node: ConfigNode
    let path: String
    private(set) var remaining: [String]

    init(_ node: ConfigNode, path: String) {
        self.node = node
        self.path = path
        remaining = node.keys
    }

    func requireMap() throws(ConfigError) {
        guard case .map = node.value else { throw ConfigError(line: node.line, path: path, message: "must be a map of fields") }
    }

    func has(_ key: String) -> Bool { node[key] != nil }

    mutating func take(_ key: String) -> ConfigNode? {
        remaining.removeAll { $0 == key }
        return node[key]
    }

    func error(at node: ConfigNode, _ key: String, _ message: String) -> ConfigError {
        ConfigError(line: node.line, path: path.isEmpty ? key : "\(path).\(key)", message: message)
    }

    func rejectUnknown() throws(ConfigError) {
        if let unknown = remaining.first { throw error(at: node[unknown]!, unknown, "unknown field") }
    }

    mutating func scalar(_ key: String) throws(ConfigError) -> (String, ConfigNode)? {
        guard let value = take(key) else { return nil }
        if case .null = value.value { return nil }
        guard case .scalar(let text) = value.value else { throw error(at: value, key, "must be a single value") }
        return (text, value)
    }

    mutating func optionalLabel(_ key: String) throws(ConfigError) -> String? {
        guard let (text, node) = try scalar(key) else { return nil }
        guard !text.isEmpty, text.utf8.count <= 256, !text.utf8.contains(where: { $0 < 0x20 }) else {
            throw error(at: node, key, "must be 1 to 256 characters without control characters")
        }
        return text
    }

    mutating func time(_ key: String) throws(ConfigError) -> EventTime {
        guard let (text, node) = try scalar(key) else { throw error(at: self.node, key, "is required (RFC 3339, e.g. 2026-01-01T00:00:00Z)") }
        guard let time = EventTime(text) else { throw error(at: node, key, "must be an RFC 3339 time with offset, e.g. 2026-01-01T00:00:00Z") }
        return time
    }

    mutating func currency(_ key: String) throws(ConfigError) -> Currency {
        guard let (text, node) = try scalar(key) else { throw error(at: self.node, key, "is required (ISO 4217 code, e.g. USD)") }
        guard let currency = Currency(text) else { throw error(at: node, key, "must be an ISO 4217 code such as USD") }
        return currency
    }

    mutating func unit(_ key: String) throws(ConfigError) -> PriceUnit? {
        guard let (text, node) = try scalar(key) else { return nil }
        guard let unit = PriceUnit(rawValue: text) else { throw error(at: node, key, "must be per_1m_tokens or per_token") }
        return unit
    }

    mutating func optionalMoney(_ key: String) throws(ConfigError) -> Int64? {
        guard let (text, node) = try scalar(key) else { return nil }
        guard let nanos = Money.nanos(text), nanos >= 0 else { throw error(at: node, key, "\"\(text)\" is not an amount: a non-negative decimal with at most 9 decimals") }
        return nanos
    }

    mutating func positiveInteger(_ key: String) throws(ConfigError) -> Int64 {
        guard let (text, node) = try scalar(key) else { throw error(at: self.node, key, "is required") }
        guard let value = Int64(text), value > 0 else { throw error(at: node, key, "must be a whole number above 0") }
        return value
    }
}
