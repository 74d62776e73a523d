/// The token types a model call is billed by. Input and output here are the parts not
/// billed separately: input without cached tokens, output without reasoning tokens.
public enum TokenType: String, Sendable, CaseIterable, Comparable {
    case input, output
    case cacheRead = "cache_read"
    /// 5-minute cache writes (all cache writes when the book has no `cache_write_1h` price).
    case cacheWrite = "cache_write"
    /// 1-hour cache writes: Anthropic bills them at 2× the input price, 5-minute ones at 1.25×.
    case cacheWrite1h = "cache_write_1h"
    case reasoning
    /// Not a token: the units of a meter (`PriceItem.model` then names the meter).
    case meter

    /// The token types a model's prices name (every case but `meter`).
    public static let tokens: [TokenType] = [.input, .output, .cacheRead, .cacheWrite, .cacheWrite1h, .reasoning]

    public static func < (a: TokenType, b: TokenType) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// A per-token price in units of 10^-24 of the currency: exact for any price with up to 24
/// decimals per token (18 per 1M tokens), such as LiteLLM's `1.1428571428571428e-06`.
///
/// Whenever a charge fits a stored amount (`Money.maxNanos`, about 9.2 × 10^33 of these units),
/// the product of quantity and rate fits 128 bits, so the finer unit costs no range.
public struct TokenRate: Hashable, Sendable, Comparable {
    /// The price of one token in 10^-24 currency units.
    public let unitsPerToken: Int128
    /// Decimal digits of `unitsPerToken` below one currency unit.
    public static let scale = 24

    public init(unitsPerToken: Int128) { self.unitsPerToken = unitsPerToken }

    public static func < (a: TokenRate, b: TokenRate) -> Bool { a.unitsPerToken < b.unitsPerToken }

    /// Parses a price per `unit` tokens; nil when it is negative or finer than 10^-24 per token.
    public static func parse(_ text: String, perTokens unit: PriceUnit) -> TokenRate? {
        guard let decimal = ExactDecimal(text), !decimal.isNegative,
              let units = decimal.scaled(unit == .perToken ? scale : scale - 6) else { return nil }
        return TokenRate(unitsPerToken: units)
    }

    /// The price per 1M tokens as decimal text, at least two decimals as prices are written ("2.50").
    public var perMillionText: String {
        Money.format(unitsPerToken, scale: Self.scale - 6, minimumFractionDigits: 2)
    }

    /// The price of one unit (a meter's) as decimal text, at least two decimals ("0.002").
    public var perUnitText: String {
        Money.format(unitsPerToken, scale: Self.scale, minimumFractionDigits: 2)
    }

    /// Exact cost of `tokens` tokens in 10^-24 units; nil when it exceeds 128 bits.
    func units(_ tokens: Int64) -> Int128? {
        let (product, overflow) = Int128(tokens).multipliedReportingOverflow(by: unitsPerToken)
        return overflow ? nil : product
    }
}

public enum PriceUnit: String, Sendable {
    case perMillion = "per_1m_tokens"
    case perToken = "per_token"
}

/// One band of a tiered price: tokens up to and including `upTo` (nil: no upper bound).
public struct PriceTier: Hashable, Sendable {
    public let upTo: Int64?
    public let rate: TokenRate

    public init(upTo: Int64?, rate: TokenRate) {
        self.upTo = upTo
        self.rate = rate
    }
}

/// How a cumulative quantity turns into a charge. Charges are a function of the quantity
/// for a whole billing period (invariant 5): a batch is charged `charge(q_new) - charge(q_old)`.
public enum PricingModel: Hashable, Sendable {
    /// Every token at one rate.
    case perUnit(TokenRate)
    /// A price per started block of `size` tokens (rounded up).
    case package(size: Int64, priceNanos: Int64)
    /// Each token at the rate of the tier it falls in.
    case graduated([PriceTier])
    /// All tokens at the rate of the tier the total falls in.
    case volume([PriceTier])

    /// The charge in nano-units for a billing period's cumulative `quantity`, rounded once
    /// (half away from zero) from the exact value; nil when it exceeds `Money.maxNanos`.
    ///
    /// Exact for every quantity ≥ 0 and every price a book accepts: the 10^-24-unit products are
    /// computed in 128 bits with overflow checked, so no input traps.
    public func charge(_ quantity: Int64) -> Int64? {
        precondition(quantity >= 0, "quantities are never negative")
        return exactNanos(quantity).flatMap(Money.narrow)
    }

    /// The charge in nano-units, rounded once, wide; nil only when the exact value exceeds 128 bits.
    public func exactNanos(_ quantity: Int64) -> Int128? {
        switch self {
        case .perUnit(let rate):
            return rate.units(quantity).map(Self.nanos)
        case .package(let size, let price):
            let blocks = quantity / size + (quantity % size == 0 ? 0 : 1)
            // Both below 2^63: the product fits 128 bits.
            return Int128(blocks) * Int128(price)
        case .graduated(let tiers):
            var total: Int128 = 0
            var lower: Int64 = 0
            for tier in tiers where quantity > lower {
                let upper = min(quantity, tier.upTo ?? Int64.max)
                guard let units = tier.rate.units(upper - lower) else { return nil }
                let (sum, overflow) = total.addingReportingOverflow(units)
                if overflow { return nil }
                total = sum
                lower = upper
            }
            return Self.nanos(total)
        case .volume(let tiers):
            let tier = tiers.first { $0.upTo.map { quantity <= $0 } ?? true } ?? tiers[tiers.count - 1]
            return tier.rate.units(quantity).map(Self.nanos)
        }
    }

    /// 10^-24 units to nano-units, rounded half away from zero.
    private static func nanos(_ units: Int128) -> Int128 { Money.divideRounded(units, by: 1_000_000_000_000_000) }

    /// The most `quantity` more tokens can add to any period's charge: every token at the
    /// highest tier rate, or one block more than the tokens fill. For credit reservations;
    /// `Money.maxNanos` when that exceeds what an amount can hold (a hold that large refuses the call).
    public func marginalCeiling(_ quantity: Int64) -> Int64 {
        guard quantity > 0 else { return 0 }
        let ceiling: Int64?
        switch self {
        case .perUnit: ceiling = charge(quantity)
        case .package(let size, let price): ceiling = Money.narrow((Int128(quantity / size) + 1) * Int128(price))
        case .graduated(let tiers), .volume(let tiers):
            let highest = tiers.map(\.rate).max() ?? TokenRate(unitsPerToken: 0)
            ceiling = PricingModel.perUnit(highest).charge(quantity)
        }
        return ceiling ?? Money.maxNanos
    }

    /// How the price reads on an invoice line.
    public func describe(_ currency: Currency) -> String {
        func tiers(_ tiers: [PriceTier]) -> String {
            tiers.map { tier in
                "\(tier.rate.perMillionText)/1M" + (tier.upTo.map { " up to \($0)" } ?? " above")
            }.joined(separator: ", ")
        }
        switch self {
        case .perUnit(let rate): return "\(rate.perMillionText) \(currency) / 1M tokens"
        case .package(let size, let price): return "\(Money.format(nanos: price)) \(currency) per \(size) tokens"
        case .graduated(let list): return "graduated: \(tiers(list)) (\(currency))"
        case .volume(let list): return "volume: \(tiers(list)) (\(currency))"
        }
    }

    /// How a price item's pricing reads on invoices and in `rated_usage.pricing`.
    public func describe(_ item: PriceItem, currency: Currency) -> String {
        item.tokenType == .meter ? describeMeter(currency, unit: "unit") : describe(currency) + item.contextTierText
    }

    /// As `describe`, for a meter's prices, which are per unit of the meter.
    public func describeMeter(_ currency: Currency, unit: String) -> String {
        func tiers(_ tiers: [PriceTier]) -> String {
            tiers.map { tier in "\(tier.rate.perUnitText)" + (tier.upTo.map { " up to \($0)" } ?? " above") }.joined(separator: ", ")
        }
        switch self {
        case .perUnit(let rate): return "\(rate.perUnitText) \(currency) / \(unit)"
        case .package(let size, let price): return "\(Money.format(nanos: price)) \(currency) per \(size) \(unit)"
        case .graduated(let list): return "graduated per \(unit): \(tiers(list)) (\(currency))"
        case .volume(let list): return "volume per \(unit): \(tiers(list)) (\(currency))"
        }
    }
}

/// Prices for whole requests whose input passes a size: "above 200,000 input tokens the whole
/// request is priced at these rates" (Gemini 2.5 Pro; Claude Sonnet's 1M-token context;
/// LiteLLM's `*_above_200k_tokens` fields).
public struct ContextTier: Hashable, Sendable {
    /// The tier applies to a request with more input tokens than this (cached ones included).
    public let aboveInputTokens: Int64
    /// Replace the model's base prices for the token types they name; the others stay.
    public let prices: [TokenType: PricingModel]

    public init(aboveInputTokens: Int64, prices: [TokenType: PricingModel]) {
        self.aboveInputTokens = aboveInputTokens
        self.prices = prices
    }
}

/// A price rule's condition: the event's `dimension` has one of `values`, compared byte for
/// byte (as PostgreSQL compares text). A dimension is one of the event's labels (`provider`,
/// `feature`, `environment`) or a property (`status`, `service_tier`, `batch`, `team`, …); the
/// label wins over a property of the same name, as in meter windows (`UsageEvent.dimension`).
/// An event without the dimension meets no condition on it.
public struct PriceCondition: Hashable, Sendable {
    public let dimension: String
    /// One or more values, any of which meets the condition.
    public let values: [String]

    public init(dimension: String, values: [String]) {
        self.dimension = dimension
        self.values = values
    }

    public func holds(for event: UsageEvent) -> Bool {
        guard let value = event.dimension(dimension) else { return false }
        return values.contains { ExactText.equal($0, value) }
    }
}

/// Prices for the events whose dimensions meet every one of `conditions`: a feature priced on
/// its own, a service tier, the batch API, a region. `Prices` is a model's `ModelPrices` or a
/// meter's `PricingModel`. Invoice lines name the rule that priced them.
public struct PriceRule<Prices: Hashable & Sendable>: Hashable, Sendable {
    /// Unique among one model's (or meter's) rules; shown on invoice lines.
    public let name: String
    /// At least one; all must hold.
    public let conditions: [PriceCondition]
    public let prices: Prices

    public init(name: String, conditions: [PriceCondition], prices: Prices) {
        self.name = name
        self.conditions = conditions
        self.prices = prices
    }

    /// The most specific rule that prices `event`: of the rules whose conditions all hold, the one
    /// with the most conditions; of equally many, the first listed. Nil when none holds (the
    /// base prices apply).
    public static func select(_ rules: [PriceRule], for event: UsageEvent) -> PriceRule? {
        var best: PriceRule?
        for rule in rules where rule.conditions.count > (best?.conditions.count ?? 0) && rule.conditions.allSatisfy({ $0.holds(for: event) }) {
            best = rule
        }
        return best
    }
}

/// The prices of one model (and its aliases) in a price book.
public struct ModelPrices: Hashable, Sendable {
    public let model: String
    public let aliases: [String]
    public let prices: [TokenType: PricingModel]
    /// Ascending by `aboveInputTokens`; a request takes the highest it passes.
    public let contextTiers: [ContextTier]
    /// Prices for calls with given dimensions. A rule's `prices` are whole: the token types the
    /// rule names at its prices, the others at the model's base prices, and only the rule's own
    /// context tiers (see `PriceRule.select` for which rule wins).
    public let rules: [PriceRule<ModelPrices>]
    /// Each tier's prices over the base ones, worked out once (rating asks per event).
    private let tierPrices: [[TokenType: PricingModel]]

    public init(model: String, aliases: [String] = [], prices: [TokenType: PricingModel], contextTiers: [ContextTier] = [],
                rules: [PriceRule<ModelPrices>] = []) {
        self.model = model
        self.aliases = aliases
        self.prices = prices
        self.contextTiers = contextTiers.sorted { $0.aboveInputTokens < $1.aboveInputTokens }
        self.rules = rules
        tierPrices = self.contextTiers.map { tier in prices.merging(tier.prices) { $1 } }
    }

    /// The prices that apply to `event`: the rule that wins (its name) or the base prices ("").
    public func resolve(for event: UsageEvent) -> (rule: String, prices: ModelPrices) {
        guard !rules.isEmpty, let rule = PriceRule.select(rules, for: event) else { return ("", self) }
        return (rule.name, rule.prices)
    }

    /// The same prices and tiers, under the model's name alone, without rules (a rule's prices).
    public var withoutAliases: ModelPrices { ModelPrices(model: model, prices: prices, contextTiers: contextTiers) }

    /// The prices of the rule named `rule` ("" for the base prices).
    public func prices(rule: String) -> ModelPrices? {
        rule.isEmpty ? self : rules.first { $0.name == rule }?.prices
    }

    /// The context tier a request falls in (its `aboveInputTokens`, 0 for none) and the prices
    /// that apply to the whole request.
    public func applicable(to event: UsageEvent) -> (contextAbove: Int64, prices: [TokenType: PricingModel]) {
        guard let index = contextTiers.lastIndex(where: { event.inputTokens > $0.aboveInputTokens }) else { return (0, prices) }
        return (contextTiers[index].aboveInputTokens, tierPrices[index])
    }

    /// The prices of the tier that starts above `contextAbove` input tokens (0: the base prices).
    public func prices(contextAbove: Int64) -> [TokenType: PricingModel]? {
        if contextAbove == 0 { return prices }
        return contextTiers.firstIndex { $0.aboveInputTokens == contextAbove }.map { tierPrices[$0] }
    }

    /// The base prices and each tier's, for bounds that must hold whatever the request's size.
    public var allTierPrices: [[TokenType: PricingModel]] { [prices] + tierPrices }

    /// The base prices and every rule's: for bounds that must hold whatever the call's dimensions.
    public var allRulePrices: [ModelPrices] { [self] + rules.map(\.prices) }

    /// Billable quantities per token type of one event at its tier's prices.
    public func quantities(_ event: UsageEvent) -> [(TokenType, Int64)] {
        Self.quantities(event, prices: applicable(to: event).prices)
    }

    /// Billable quantities per token type of one event. Cached and reasoning tokens are
    /// billed at their own price when the book has one, else as plain input/output; 1-hour
    /// cache writes at the `cache_write_1h` price, else like the other cache writes.
    public static func quantities(_ event: UsageEvent, prices: [TokenType: PricingModel]) -> [(TokenType, Int64)] {
        var input = event.inputTokens - event.cacheReadInputTokens - event.cacheWriteInputTokens
        var output = event.outputTokens - event.reasoningOutputTokens
        var cacheWrite = event.cacheWriteInputTokens
        var result: [(TokenType, Int64)] = []
        if prices[.cacheRead] != nil { result.append((.cacheRead, event.cacheReadInputTokens)) } else { input += event.cacheReadInputTokens }
        if prices[.cacheWrite1h] != nil {
            result.append((.cacheWrite1h, event.cacheWrite1hInputTokens))
            cacheWrite -= event.cacheWrite1hInputTokens
        }
        if prices[.cacheWrite] != nil { result.append((.cacheWrite, cacheWrite)) } else { input += cacheWrite }
        if prices[.reasoning] != nil { result.append((.reasoning, event.reasoningOutputTokens)) } else { output += event.reasoningOutputTokens }
        result.append((.input, input))
        result.append((.output, output))
        return result.filter { $0.1 > 0 }.sorted { $0.0 < $1.0 }
    }
}

/// One version of a price book: the default book (or a named plan), or a customer's override.
public struct PriceBook: Hashable, Sendable {
    /// The plan name ("default"); customers follow the "default" book unless set otherwise.
    public let name: String
    /// Set for a customer override: its prices win over the customer's plan for the models it lists.
    public let customerID: String?
    /// Assigned by the catalog store, increasing per (name, customer).
    public var version: Int
    public let effectiveFrom: EventTime
    public let currency: Currency
    /// Charged on the invoice when a period's usage comes to less.
    public let minimumPerPeriodNanos: Int64?
    public let models: [ModelPrices]
    /// Prices of meters (per unit of each), charged like tokens over a billing period.
    public let meters: [MeterPrice]

    public init(name: String, customerID: String? = nil, version: Int = 0, effectiveFrom: EventTime, currency: Currency,
                minimumPerPeriodNanos: Int64? = nil, models: [ModelPrices], meters: [MeterPrice] = []) {
        self.name = name
        self.customerID = customerID
        self.version = version
        self.effectiveFrom = effectiveFrom
        self.currency = currency
        self.minimumPerPeriodNanos = minimumPerPeriodNanos
        self.models = models
        self.meters = meters
    }

    /// The base price of a meter, if this book has one.
    public func price(ofMeter meter: String) -> PricingModel? { meterPrice(meter)?.pricing }

    /// A meter's prices (the base and its rules), if this book has them.
    public func meterPrice(_ meter: String) -> MeterPrice? { meters.first { $0.meter == meter } }

    /// The model's prices: exact name or alias first, then aliases ending in `*` (longest prefix
    /// wins), then the same without a `provider/` prefix.
    public func prices(for model: String) -> ModelPrices? {
        if let exact = models.first(where: { $0.model == model || $0.aliases.contains(model) }) { return exact }
        var best: (length: Int, prices: ModelPrices)?
        for prices in models {
            for alias in prices.aliases where alias.hasSuffix("*") {
                let prefix = alias.dropLast()
                if model.hasPrefix(prefix), prefix.count > (best?.length ?? -1) { best = (prefix.count, prices) }
            }
        }
        if let best { return best.prices }
        if let slash = model.firstIndex(of: "/") { return prices(for: String(model[model.index(after: slash)...])) }
        return nil
    }
}

/// A meter's price in a book: `pricing` applies to a billing period's cumulative units.
public struct MeterPrice: Hashable, Sendable {
    public let meter: String
    public let pricing: PricingModel
    /// Prices for readings with given dimensions (see `PriceRule.select` for which rule wins).
    public let rules: [PriceRule<PricingModel>]

    public init(meter: String, pricing: PricingModel, rules: [PriceRule<PricingModel>] = []) {
        self.meter = meter
        self.pricing = pricing
        self.rules = rules
    }

    /// The pricing that applies to `event`'s reading: the rule that wins (its name) or the base ("").
    public func resolve(for event: UsageEvent) -> (rule: String, pricing: PricingModel) {
        guard !rules.isEmpty, let rule = PriceRule.select(rules, for: event) else { return ("", pricing) }
        return (rule.name, rule.prices)
    }

    /// The pricing of the rule named `rule` ("" for the base price).
    public func pricing(rule: String) -> PricingModel? {
        rule.isEmpty ? pricing : rules.first { $0.name == rule }?.prices
    }
}

/// What an event's model is priced by, or nil when no book in force prices it.
public struct PriceMatch: Sendable {
    public let book: PriceBook
    public let prices: ModelPrices
}

/// Every version of every price book; answers "which prices apply to this call".
public struct PriceCatalog: Sendable {
    public let books: [PriceBook]
    /// Customers with an override book: for everyone else only the plan decides the match.
    let overrideCustomers: Set<String>
    /// Every effective-from time, ascending: between two of them the books in force stay the same.
    private let changes: [EventTime]

    public init(books: [PriceBook]) {
        // Newest first, so the first book in force is the one that applies.
        self.books = books.sorted { ($0.effectiveFrom, $0.version) > ($1.effectiveFrom, $1.version) }
        overrideCustomers = Set(books.compactMap(\.customerID))
        changes = Set(books.map(\.effectiveFrom)).sorted()
    }

    /// Which stretch between effective-from times `time` falls in: equal stretches, equal books in force.
    func stretch(containing time: EventTime) -> Int {
        var low = 0
        var high = changes.count
        while low < high {
            let middle = (low + high) / 2
            if changes[middle] <= time { low = middle + 1 } else { high = middle }
        }
        return low
    }

    /// The version of `name` (or of the customer's override when `customerID` is set) in force at `time`.
    public func book(named name: String, customerID: String? = nil, at time: EventTime) -> PriceBook? {
        books.first { $0.name == name && $0.customerID == customerID && $0.effectiveFrom <= time }
    }

    /// The customer's override in force at the event time wins when it prices the model;
    /// then the customer's plan in force at that time.
    public func match(customerID: String, plan: String, model: String, at time: EventTime) -> PriceMatch? {
        if let override = books.first(where: { $0.customerID == customerID && $0.effectiveFrom <= time }),
           let prices = override.prices(for: model) {
            return PriceMatch(book: override, prices: prices)
        }
        if let book = book(named: plan, at: time), let prices = book.prices(for: model) {
            return PriceMatch(book: book, prices: prices)
        }
        return nil
    }

    /// The book in force that prices `meter` for the customer at `time`, and its prices: the
    /// customer's override first, then the plan, as for models.
    public func match(customerID: String, plan: String, meter: String, at time: EventTime) -> (book: PriceBook, price: MeterPrice)? {
        if let override = books.first(where: { $0.customerID == customerID && $0.effectiveFrom <= time }), let price = override.meterPrice(meter) {
            return (override, price)
        }
        if let book = book(named: plan, at: time), let price = book.meterPrice(meter) { return (book, price) }
        return nil
    }

    /// The book version and pricing a stored price item refers to.
    public func pricing(of item: PriceItem) -> (book: PriceBook, pricing: PricingModel)? {
        guard let book = books.first(where: {
            $0.name == item.bookName && ($0.customerID ?? "") == item.bookCustomer && $0.version == item.bookVersion
        }) else { return nil }
        if item.tokenType == .meter { return book.meterPrice(item.model)?.pricing(rule: item.rule).map { (book, $0) } }
        guard let pricing = book.models.first(where: { $0.model == item.model })?.prices(rule: item.rule)?
            .prices(contextAbove: item.contextAbove)?[item.tokenType]
        else { return nil }
        return (book, pricing)
    }
}
