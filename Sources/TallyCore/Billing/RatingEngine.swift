/// A price item a customer accumulates quantity on: one token type of one model in one
/// version of one price book.
public struct PriceItem: Hashable, Sendable, Comparable {
    public let bookName: String
    /// The customer of an override book; empty for a plan.
    public let bookCustomer: String
    public let bookVersion: Int
    public let model: String
    public let tokenType: TokenType
    /// The context tier (`ContextTier.aboveInputTokens`) of the requests it counts; 0 for the base prices.
    public let contextAbove: Int64
    /// The price rule (`PriceRule.name`) of the model or meter that priced it; empty for the base prices.
    public let rule: String
    /// Hashed once here: every usage event hashes its charge keys several times (see `ChargeKey`).
    private let hashCode: Int

    public init(bookName: String, bookCustomer: String, bookVersion: Int, model: String, tokenType: TokenType, contextAbove: Int64 = 0,
                rule: String = "") {
        self.bookName = bookName
        self.bookCustomer = bookCustomer
        self.bookVersion = bookVersion
        self.model = model
        self.tokenType = tokenType
        self.contextAbove = contextAbove
        self.rule = rule
        var hasher = Hasher()
        hasher.combine(bookName)
        hasher.combine(bookCustomer)
        hasher.combine(bookVersion)
        hasher.combine(model)
        hasher.combine(tokenType)
        hasher.combine(contextAbove)
        hasher.combine(rule)
        hashCode = hasher.finalize()
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(hashCode) }

    /// `" for requests above 200000 input tokens"` for a context tier's item, else empty.
    public var contextTierText: String { contextAbove > 0 ? " for requests above \(contextAbove) input tokens" : "" }

    /// `" (rule summaries)"` for an item a price rule priced, else empty.
    public var ruleText: String { rule.isEmpty ? "" : " (rule \(rule))" }

    public static func == (a: PriceItem, b: PriceItem) -> Bool {
        a.hashCode == b.hashCode && a.bookVersion == b.bookVersion && a.tokenType == b.tokenType && a.contextAbove == b.contextAbove
            && a.model == b.model && a.bookName == b.bookName && a.bookCustomer == b.bookCustomer && a.rule == b.rule
    }

    public static func < (a: PriceItem, b: PriceItem) -> Bool {
        // Tuples compare up to six members.
        let first = (a.bookName, a.bookCustomer, a.bookVersion, a.model), other = (b.bookName, b.bookCustomer, b.bookVersion, b.model)
        return first < other || (first == other && (a.rule, a.contextAbove, a.tokenType) < (b.rule, b.contextAbove, b.tokenType))
    }
}

/// Where a customer's cumulative quantity for a price item lives: per billing period.
public struct ChargeKey: Hashable, Sendable, Comparable {
    public let customerID: String
    public let periodStart: Int64
    public let item: PriceItem
    /// Hashed once: a key is looked up, stored and marked touched for every event it charges.
    private let hashCode: Int

    public init(customerID: String, periodStart: Int64, item: PriceItem) {
        self.customerID = customerID
        self.periodStart = periodStart
        self.item = item
        var hasher = Hasher()
        hasher.combine(customerID)
        hasher.combine(periodStart)
        hasher.combine(item)
        hashCode = hasher.finalize()
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(hashCode) }

    public static func == (a: ChargeKey, b: ChargeKey) -> Bool {
        a.hashCode == b.hashCode && a.periodStart == b.periodStart && a.customerID == b.customerID && a.item == b.item
    }

    public static func < (a: ChargeKey, b: ChargeKey) -> Bool {
        (a.customerID, a.periodStart) < (b.customerID, b.periodStart) || ((a.customerID, a.periodStart) == (b.customerID, b.periodStart) && a.item < b.item)
    }
}

/// A period's cumulative quantity of one price item and the charge for it (`pricing.charge(quantity)`).
public struct ChargeTotal: Hashable, Sendable {
    public var quantity: Int64
    public var amountNanos: Int64
    public var currency: Currency

    public init(quantity: Int64, amountNanos: Int64, currency: Currency) {
        self.quantity = quantity
        self.amountNanos = amountNanos
        self.currency = currency
    }
}

public struct WalletKey: Hashable, Sendable, Comparable {
    public let customerID: String
    public let currency: Currency

    public init(customerID: String, currency: Currency) {
        self.customerID = customerID
        self.currency = currency
    }

    public static func < (a: WalletKey, b: WalletKey) -> Bool { (a.customerID, a.currency.code) < (b.customerID, b.currency.code) }
}

/// A grant and what is left of it.
public struct GrantBalance: Hashable, Sendable {
    public let grantID: String
    public let amountNanos: Int64
    public var remainingNanos: Int64
    public let priority: Int64
    public let expiresAt: Int64?
    public let grantedAt: Int64
    public let source: GrantSource

    public init(grantID: String, amountNanos: Int64, remainingNanos: Int64, priority: Int64, expiresAt: Int64?, grantedAt: Int64, source: GrantSource) {
        self.grantID = grantID
        self.amountNanos = amountNanos
        self.remainingNanos = remainingNanos
        self.priority = priority
        self.expiresAt = expiresAt
        self.grantedAt = grantedAt
        self.source = source
    }

    /// Something is left of it after it expired (at `now` or before): that is written off.
    func hasExpiredRemainder(by now: Int64) -> Bool {
        remainingNanos > 0 && (expiresAt.map { $0 <= now } ?? false)
    }

    /// Drawing order: lowest priority number, then earliest expiry (never-expiring last).
    static func drawsBefore(_ a: GrantBalance, _ b: GrantBalance) -> Bool {
        (a.priority, a.expiresAt ?? Int64.max, a.grantedAt, a.grantID) < (b.priority, b.expiresAt ?? Int64.max, b.grantedAt, b.grantID)
    }
}

/// One wallet's running state. The ledger is the truth; this is its sum, kept for speed.
public struct WalletState: Hashable, Sendable {
    public var balanceNanos: Int64 = 0
    public var blocked = false
    public var blockedSince: Int64?
    /// Grants with credit left (and any touched in this batch).
    public var grants: [GrantBalance] = []

    public init(balanceNanos: Int64 = 0, blocked: Bool = false, blockedSince: Int64? = nil, grants: [GrantBalance] = []) {
        self.balanceNanos = balanceNanos
        self.blocked = blocked
        self.blockedSince = blockedSince
        self.grants = grants
    }
}

public enum LedgerKind: String, Sendable {
    case grant, usage, expiry
    /// What was left of a grant when a `tally.wallet.grant.void` voided it.
    case void
}

/// An append-only wallet ledger entry. (customer, partition, offset, seq) identifies it:
/// the record it came from and its place among that record's entries.
public struct LedgerEntry: Hashable, Sendable {
    public let wallet: WalletKey
    public let position: LogPosition
    public let seq: Int32
    public let kind: LedgerKind
    public let amountNanos: Int64
    /// The grant credited, drawn on or written off; nil for usage charged beyond all grants.
    public let grantID: String?
    /// The usage event charged, or the grant event.
    public let eventID: String
    /// Event time (expiry entries: the expiry time).
    public let effectiveAt: EventTime
    /// Usage entries: the billing period of the usage.
    public let periodStart: Int64?
}

public struct BalanceAlert: Hashable, Sendable {
    public let wallet: WalletKey
    public let thresholdNanos: Int64
    public let balanceNanos: Int64
    public let crossedAt: Int64
    public let position: LogPosition
    public let seq: Int32

    /// Deterministic, so a re-processed batch cannot raise a second alert for the same crossing.
    public var alertID: String { "\(wallet.customerID)/\(wallet.currency)/\(thresholdNanos)/\(position.partition)-\(position.offset)-\(seq)" }
}

public struct TopUpRequest: Hashable, Sendable {
    public let wallet: WalletKey
    public let rule: AutoTopUpRule
    public let balanceNanos: Int64
    public let requestedAt: Int64
    public let position: LogPosition
    public let seq: Int32

    public var requestID: String { "\(wallet.customerID)/\(wallet.currency)/topup/\(position.partition)-\(position.offset)-\(seq)" }
}

/// A record the rater handles, in log order.
public enum RaterRecord: DedupCandidate, Equatable {
    case usage(PositionedEvent)
    case grant(PositionedGrant)
    case grantVoid(PositionedGrantVoid)
    case budget(PositionedBudget)

    public var key: DedupKey {
        switch self {
        case .usage(let event): event.key
        case .grant(let grant): grant.key
        case .grantVoid(let void): void.key
        case .budget(let budget): budget.key
        }
    }

    public var position: LogPosition {
        switch self {
        case .usage(let event): event.position
        case .grant(let grant): grant.position
        case .grantVoid(let void): void.position
        case .budget(let budget): budget.position
        }
    }

    public var contentHash: UInt64 {
        switch self {
        case .usage(let event): event.contentHash
        case .grant(let grant): grant.contentHash
        case .grantVoid(let void): void.contentHash
        case .budget(let budget): budget.contentHash
        }
    }

    public var keyFingerprint: DedupKeyCache.Fingerprint {
        switch self {
        case .usage(let event): event.keyFingerprint
        case .grant(let grant): grant.keyFingerprint
        case .grantVoid(let void): void.keyFingerprint
        case .budget(let budget): budget.keyFingerprint
        }
    }

    /// The record's event time.
    public var time: EventTime {
        switch self {
        case .usage(let positioned): positioned.event.time
        case .grant(let positioned): positioned.grant.time
        case .grantVoid(let positioned): positioned.void.time
        case .budget(let positioned): positioned.budget.time
        }
    }

    public var customerID: String { key.customerID }
}

/// What a priced usage event adds: quantity per price item, charged in one currency.
public struct UsageCharge: Sendable {
    public let currency: Currency
    public let periodStart: Int64
    public let items: [(key: ChargeKey, quantity: Int64, pricing: PricingModel)]
    /// Why the event cannot be charged at all (it is then kept in `unrateable_records`).
    public var refusal: String?

    public init(currency: Currency, periodStart: Int64, items: [(key: ChargeKey, quantity: Int64, pricing: PricingModel)], refusal: String? = nil) {
        self.currency = currency
        self.periodStart = periodStart
        self.items = items
        self.refusal = refusal
    }
}

/// A record with its charge worked out (usage no price book prices, and grants, have none).
public struct PricedRecord: Sendable {
    public let record: RaterRecord
    public let charge: UsageCharge?
}

/// The state a batch reads: loaded from PostgreSQL for the batch's customers and charge keys.
public struct RatingState: Sendable {
    public var charges: [ChargeKey: ChargeTotal] = [:]
    public private(set) var wallets: [WalletKey: WalletState] = [:]
    public var profiles: [String: BillingProfile] = [:]
    /// Customers whose events' charges `RatingResult.charged` lists (those with budgets).
    public var budgetedCustomers = Set<String>()
    /// Each customer's wallet currencies, so a record finds its customer's wallets without a scan.
    private var currencies: [String: [Currency]] = [:]

    public init() {}

    public func profile(_ customerID: String) -> BillingProfile { profiles[customerID] ?? BillingProfile(customerID: customerID) }

    public subscript(wallet key: WalletKey) -> WalletState? {
        get { wallets[key] }
        set {
            // One hash of the key per change: this runs for every charged event.
            if let newValue {
                if wallets.updateValue(newValue, forKey: key) == nil { currencies[key.customerID, default: []].append(key.currency) }
            } else if wallets.removeValue(forKey: key) != nil {
                currencies[key.customerID]?.removeAll { $0 == key.currency }
            }
        }
    }

    /// The customer's wallets, in currency order.
    public func walletKeys(of customerID: String) -> [WalletKey] {
        guard let list = currencies[customerID] else { return [] }
        if list.count == 1 { return [WalletKey(customerID: customerID, currency: list[0])] }
        return list.sorted { $0.code < $1.code }.map { WalletKey(customerID: customerID, currency: $0) }
    }

    public func hasWallets(of customerID: String) -> Bool { currencies[customerID] != nil }
}

/// Everything a batch appends or changes, besides the state itself.
public struct RatingResult: Sendable {
    public var ledger: [LedgerEntry] = []
    public var alerts: [BalanceAlert] = []
    public var topUps: [TopUpRequest] = []
    public var unpriced: [PositionedEvent] = []
    /// Records whose arithmetic would leave the stored range: applied not at all.
    public var unrateable: [UnrateableRecord] = []
    public var touchedCharges = Set<ChargeKey>()
    public var touchedWallets = Set<WalletKey>()
    public var grantsCredited = 0
    /// What each usage event of `RatingState.budgetedCustomers` was charged (nothing when 0).
    public var charged: [LogPosition: (currency: Currency, nanos: Int64)] = [:]
}

/// Prices usage and keeps wallets: pure, deterministic, no I/O.
///
/// Records are applied in log order. Charges follow invariant 5: each usage event adds
/// `charge(q_new) - charge(q_old)` per price item, so the sum of everything charged equals
/// the rounded charge of the period's total quantity, however the log is cut into batches.
public struct RatingEngine: Sendable {
    public let catalog: PriceCatalog
    /// Whether a priced meter counts events (1 unit each) or sums their quantities.
    public let meters: MeterCatalog

    public init(catalog: PriceCatalog, meters: MeterCatalog = MeterCatalog([])) {
        self.catalog = catalog
        self.meters = meters
    }

    /// What prices each record, worked out once: the store reads the keys to load from it,
    /// then `apply` charges with it.
    public func price(_ records: [RaterRecord], profiles: [String: BillingProfile]) -> [PricedRecord] {
        var matches: [MatchKey: (match: PriceMatch, items: MatchItems)?] = [:]
        var meterMatches: [MatchKey: (book: PriceBook, price: MeterPrice, items: [String: PriceItem])?] = [:]
        return records.map { record in
            guard case .usage(let positioned) = record else { return PricedRecord(record: record, charge: nil) }
            let event = positioned.event
            let profile = profiles[event.subject] ?? BillingProfile(customerID: event.subject)
            let period = profile.period(containing: event.time.microseconds)
            var currency: Currency?
            var charges: [(key: ChargeKey, quantity: Int64, pricing: PricingModel)] = []
            if event.isModelCall {
                guard let (bookCurrency, items) = modelCharges(event, profile: profile, period: period, matches: &matches) else {
                    return PricedRecord(record: record, charge: nil)
                }
                currency = bookCurrency
                charges = items
            }
            // Meters: each priced by the book in force that prices it (the customer's override,
            // then the plan). One event is charged in one currency: a meter priced in another
            // makes the event unrateable, with the reason, rather than charged in part.
            var refusal: String?
            for (meter, quantity) in event.meters.sorted(by: { $0.key < $1.key }) {
                let key = MatchKey(customerID: catalog.overrideCustomers.contains(event.subject) ? event.subject : "", plan: profile.plan,
                                   model: meter, stretch: catalog.stretch(containing: event.time))
                let found: (book: PriceBook, price: MeterPrice, items: [String: PriceItem])?
                if let cached = meterMatches[key] {
                    found = cached
                } else {
                    found = catalog.match(customerID: event.subject, plan: profile.plan, meter: meter, at: event.time).map { book, price in
                        (book, price, Dictionary(uniqueKeysWithValues: ([""] + price.rules.map(\.name)).map { rule in
                            (rule, PriceItem(bookName: book.name, bookCustomer: book.customerID ?? "", bookVersion: book.version, model: meter,
                                             tokenType: .meter, rule: rule))
                        }))
                    }
                    meterMatches[key] = .some(found)
                }
                guard let (book, price, items) = found else { continue }
                if let currency, currency != book.currency {
                    refusal = refusal ?? "meter \(meter) is priced in \(book.currency) (book \(book.name) v\(book.version)), "
                        + "the event's other charges in \(currency): one event is charged in one currency"
                    continue
                }
                let units = meters.meters[meter]?.aggregation == .count ? 1 : quantity
                guard units > 0 else { continue }
                currency = book.currency
                let (rule, pricing) = price.resolve(for: event)
                charges.append((ChargeKey(customerID: event.subject, periodStart: period.start, item: items[rule]!), units, pricing))
            }
            guard let currency else { return PricedRecord(record: record, charge: nil) }
            return PricedRecord(record: record, charge: UsageCharge(currency: currency, periodStart: period.start, items: charges, refusal: refusal))
        }
    }

    /// One customer kind, plan, model (or meter) and stretch of time always match the same prices:
    /// each is looked up (and its price items built) once per batch, not once per event.
    private struct MatchKey: Hashable {
        let customerID: String
        let plan: String
        let model: String
        let stretch: Int
    }

    /// A model call's token charges at the prices that match it, or nil when none does (unpriced).
    /// A match's price items, built once per batch: per rule ("" for the base prices), per context
    /// tier, per token type.
    private typealias MatchItems = [String: [Int64: [TokenType: PriceItem]]]

    private func modelCharges(_ event: UsageEvent, profile: BillingProfile, period: BillingPeriod,
                              matches: inout [MatchKey: (match: PriceMatch, items: MatchItems)?])
        -> (Currency, [(key: ChargeKey, quantity: Int64, pricing: PricingModel)])? {
        let key = MatchKey(customerID: catalog.overrideCustomers.contains(event.subject) ? event.subject : "", plan: profile.plan,
                           model: event.model, stretch: catalog.stretch(containing: event.time))
        let found: (match: PriceMatch, items: MatchItems)?
        if let cached = matches[key] {
            found = cached
        } else {
            found = catalog.match(customerID: event.subject, plan: profile.plan, model: event.model, at: event.time).map { match in
                var items: MatchItems = [:]
                for (rule, prices) in [("", match.prices)] + match.prices.rules.map({ ($0.name, $0.prices) }) {
                    let tiers = [0] + prices.contextTiers.map(\.aboveInputTokens)
                    items[rule] = Dictionary(uniqueKeysWithValues: tiers.map { tier in
                        (tier, Dictionary(uniqueKeysWithValues: TokenType.tokens.map { ($0, item(match, $0, contextAbove: tier, rule: rule)) }))
                    })
                }
                return (match, items)
            }
            matches[key] = .some(found)
        }
        guard let (match, items) = found else { return nil }
        let (rule, ruled) = match.prices.resolve(for: event)
        let (tier, prices) = ruled.applicable(to: event)
        let charges = ModelPrices.quantities(event, prices: prices).map { type, quantity in
            (key: ChargeKey(customerID: event.subject, periodStart: period.start, item: items[rule]![tier]![type]!), quantity: quantity,
             pricing: prices[type]!)
        }
        return (match.book.currency, charges)
    }

    /// The charge keys priced usage touches that `state` lacks (to load their cumulative totals first).
    public func missingChargeKeys(_ priced: [PricedRecord], in state: RatingState) -> Set<ChargeKey> {
        var missing = Set<ChargeKey>()
        for record in priced {
            for item in record.charge?.items ?? [] where state.charges[item.key] == nil { missing.insert(item.key) }
        }
        return missing
    }

    private func item(_ match: PriceMatch, _ type: TokenType, contextAbove: Int64, rule: String) -> PriceItem {
        PriceItem(bookName: match.book.name, bookCustomer: match.book.customerID ?? "", bookVersion: match.book.version,
                  model: match.prices.model, tokenType: type, contextAbove: contextAbove, rule: rule)
    }

    /// Applies records (deduplicated, in log order per partition) to `state`, priced with its profiles.
    public func apply(_ records: [RaterRecord], to state: inout RatingState) -> RatingResult {
        apply(price(records, profiles: state.profiles), to: &state)
    }

    /// Applies priced records (deduplicated, in log order per partition) to `state`.
    ///
    /// Each record's effects are worked out on a copy of its customer's wallets and charge totals
    /// and land only whole: a record whose arithmetic would leave the stored range (`Money.maxNanos`,
    /// or an `Int64` quantity) changes nothing and is listed in `result.unrateable` with its reason.
    /// The decision depends only on the records before it, so a replay decides the same.
    public func apply(_ priced: [PricedRecord], to state: inout RatingState) -> RatingResult {
        var result = RatingResult()
        // One scratch for every record: cleared, not reallocated (this runs per event).
        var effects = RecordEffects()
        for pricedRecord in priced {
            let record = pricedRecord.record
            // A budget declaration is no business of wallets (its time, set by whoever declared
            // it, must not expire grants); `BudgetEngine` counts it.
            if case .budget = record { continue }
            effects.start(customerID: record.customerID, state: state)
            do throws(RatingRefusal) {
                try expireGrants(before: record.time.microseconds, position: record.position, effects: &effects)
                switch record {
                case .grant(let positioned): try credit(positioned, effects: &effects)
                case .grantVoid(let positioned): try voidGrant(positioned, effects: &effects)
                case .budget: break  // Skipped above.
                case .usage(let positioned):
                    if let charge = pricedRecord.charge {
                        if let refusal = charge.refusal { throw RatingRefusal(refusal) }
                        try self.charge(positioned, charge, totals: state.charges, effects: &effects)
                    } else if positioned.event.isModelCall {
                        // A meter-only event has no tokens to price (its meters have windows of their own).
                        result.unpriced.append(positioned)
                    }
                }
            } catch {
                result.unrateable.append(UnrateableRecord(record: record, reason: error.reason))
                continue
            }
            effects.land(in: &state, result: &result)
            if let charged = effects.charged, state.budgetedCustomers.contains(record.customerID) { result.charged[record.position] = charged }
        }
        return result
    }

    /// Writes off what is left of grants that expired by `now` (event time), at their expiry time.
    private func expireGrants(before now: Int64, position: LogPosition, effects: inout RecordEffects) throws(RatingRefusal) {
        for key in effects.walletKeys {
            // Most records find nothing expired: look before building any list.
            guard effects.wallets[key]!.grants.contains(where: { $0.hasExpiredRemainder(by: now) }) else { continue }
            var wallet = effects.wallets[key]!
            let expired = wallet.grants.indices
                .filter { wallet.grants[$0].hasExpiredRemainder(by: now) }
                .sorted { (wallet.grants[$0].expiresAt!, wallet.grants[$0].grantID) < (wallet.grants[$1].expiresAt!, wallet.grants[$1].grantID) }
            let before = wallet.balanceNanos
            for index in expired {
                let grant = wallet.grants[index]
                effects.ledger(LedgerEntry(wallet: key, position: position, seq: effects.seq, kind: .expiry, amountNanos: -grant.remainingNanos,
                                           grantID: grant.grantID, eventID: grant.grantID, effectiveAt: EventTime(microseconds: grant.expiresAt!),
                                           periodStart: nil))
                guard let balance = Money.subtracting(wallet.balanceNanos, grant.remainingNanos) else {
                    throw RatingRefusal("expiring grant \(grant.grantID) takes wallet \(key.currency) below the smallest balance Tally stores")
                }
                wallet.balanceNanos = balance
                wallet.grants[index].remainingNanos = 0
            }
            effects.wallets[key] = wallet
            applyBalanceChange(key, from: before, at: now, position: position, effects: &effects)
        }
    }

    private func credit(_ positioned: PositionedGrant, effects: inout RecordEffects) throws(RatingRefusal) {
        let grant = positioned.grant
        let key = WalletKey(customerID: grant.subject, currency: grant.currency)
        var wallet = effects.wallets[key] ?? WalletState()
        let before = wallet.balanceNanos
        guard let balance = Money.adding(wallet.balanceNanos, grant.amountNanos) else {
            throw RatingRefusal("grant of \(Money.format(nanos: grant.amountNanos)) \(grant.currency) takes the wallet's balance "
                + "(\(Money.format(nanos: before))) past the largest Tally stores (\(Money.format(nanos: Money.maxNanos)))")
        }
        wallet.grants.append(GrantBalance(grantID: grant.id, amountNanos: grant.amountNanos, remainingNanos: grant.amountNanos,
                                          priority: grant.priority, expiresAt: grant.expiresAt?.microseconds,
                                          grantedAt: grant.time.microseconds, source: grant.grantSource))
        wallet.balanceNanos = balance
        effects.wallets[key] = wallet
        effects.ledger(LedgerEntry(wallet: key, position: positioned.position, seq: effects.seq, kind: .grant, amountNanos: grant.amountNanos,
                                   grantID: grant.id, eventID: grant.id, effectiveAt: grant.time, periodStart: nil))
        effects.grantsCredited += 1
        applyBalanceChange(key, from: before, at: grant.time.microseconds, position: positioned.position, effects: &effects)
    }

    /// Writes off what is left of the voided grant, at the void's time. A void that finds no credit
    /// left under that grant id changes nothing and is kept aside with the reason.
    private func voidGrant(_ positioned: PositionedGrantVoid, effects: inout RecordEffects) throws(RatingRefusal) {
        let void = positioned.void
        for key in effects.walletKeys {
            var wallet = effects.wallets[key]!
            guard let index = wallet.grants.firstIndex(where: { $0.grantID == void.grantID && $0.remainingNanos > 0 }) else { continue }
            let before = wallet.balanceNanos
            let remaining = wallet.grants[index].remainingNanos
            guard let balance = Money.subtracting(wallet.balanceNanos, remaining) else {
                throw RatingRefusal("voiding grant \(void.grantID) takes wallet \(key.currency) below the smallest balance Tally stores")
            }
            effects.ledger(LedgerEntry(wallet: key, position: positioned.position, seq: effects.seq, kind: .void, amountNanos: -remaining,
                                       grantID: void.grantID, eventID: void.id, effectiveAt: void.time, periodStart: nil))
            wallet.balanceNanos = balance
            wallet.grants[index].remainingNanos = 0
            effects.wallets[key] = wallet
            applyBalanceChange(key, from: before, at: void.time.microseconds, position: positioned.position, effects: &effects)
            return
        }
        throw RatingRefusal("grant \(void.grantID) of customer \(void.subject) has no credit left to void (used up, expired, "
            + "voided already, or never credited): nothing changed")
    }

    /// "output tokens of gpt-4o", "units of meter vector_searches".
    static func unitsText(_ item: PriceItem) -> String {
        item.tokenType == .meter ? "units of meter \(item.model)" : "\(item.tokenType.rawValue) tokens of \(item.model)"
    }

    private func charge(_ positioned: PositionedEvent, _ charge: UsageCharge, totals: [ChargeKey: ChargeTotal],
                        effects: inout RecordEffects) throws(RatingRefusal) {
        let event = positioned.event
        var delta: Int64 = 0
        for (key, quantity, pricing) in charge.items {
            var total = effects.total(key, stored: totals, currency: charge.currency)
            guard let cumulative = Money.adding(total.quantity, quantity) else {
                throw RatingRefusal("\(Self.unitsText(key.item)) this period pass \(Int64.max)")
            }
            guard let amount = pricing.charge(cumulative) else {
                func text(_ nanos: Int128?) -> String { nanos.map { Money.format(nanos: $0) } ?? "more than 10^29" }
                let period = pricing.exactNanos(cumulative)
                let own = period.flatMap { period in pricing.exactNanos(total.quantity).map { period - $0 } }
                throw RatingRefusal("its \(quantity) \(Self.unitsText(key.item)) cost \(text(own)) \(charge.currency), "
                    + "bringing the period's to \(text(period)) \(charge.currency), past the largest amount Tally stores "
                    + "(\(Money.format(nanos: Money.maxNanos)))")
            }
            guard let itemDelta = Money.subtracting(amount, total.amountNanos), let sum = Money.adding(delta, itemDelta) else {
                throw RatingRefusal("the charge of one event passes the largest amount Tally stores (\(Money.format(nanos: Money.maxNanos)))")
            }
            delta = sum
            total.quantity = cumulative
            total.amountNanos = amount
            effects.charges.append((key, total))
        }
        guard delta != 0 else { return }
        effects.charged = (charge.currency, delta)
        let key = WalletKey(customerID: event.subject, currency: charge.currency)
        var wallet = effects.wallets[key] ?? WalletState()
        let before = wallet.balanceNanos
        guard let balance = Money.subtracting(wallet.balanceNanos, delta) else {
            throw RatingRefusal("charging \(Money.format(nanos: delta)) \(charge.currency) takes the wallet's balance "
                + "(\(Money.format(nanos: before))) past the smallest Tally stores")
        }
        func entry(_ amount: Int64, grant: String?) {
            effects.ledger(LedgerEntry(wallet: key, position: positioned.position, seq: effects.seq, kind: .usage, amountNanos: amount,
                                       grantID: grant, eventID: event.id, effectiveAt: event.time, periodStart: charge.periodStart))
        }
        if delta > 0 {
            var left = delta
            let drawingOrder = wallet.grants.isEmpty ? []
                : wallet.grants.indices.sorted(by: { GrantBalance.drawsBefore(wallet.grants[$0], wallet.grants[$1]) })
            for index in drawingOrder where left > 0 && wallet.grants[index].remainingNanos > 0 {
                let take = min(left, wallet.grants[index].remainingNanos)
                wallet.grants[index].remainingNanos -= take
                left -= take
                entry(-take, grant: wallet.grants[index].grantID)
            }
            if left > 0 { entry(-left, grant: nil) }
        } else {
            // A volume tier can lower the period's charge: credited back, not to any grant.
            // `delta` > Int64.min: both amounts it is the difference of are ≥ 0.
            entry(-delta, grant: nil)
        }
        wallet.balanceNanos = balance
        effects.wallets[key] = wallet
        applyBalanceChange(key, from: before, at: event.time.microseconds, position: positioned.position, effects: &effects)
    }

    /// After a balance change: one alert per threshold crossed downwards, one top-up request
    /// per crossing of the rule's threshold, and the refuse-calls flag.
    private func applyBalanceChange(_ key: WalletKey, from before: Int64, at time: Int64, position: LogPosition, effects: inout RecordEffects) {
        effects.touchedWallets.insert(key)
        let profile = effects.profile
        var wallet = effects.wallets[key]!
        let after = wallet.balanceNanos
        for threshold in profile.lowBalanceThresholdsNanos.sorted(by: >) where before >= threshold && after < threshold {
            effects.alerts.append(BalanceAlert(wallet: key, thresholdNanos: threshold, balanceNanos: after, crossedAt: time, position: position, seq: effects.seq))
            effects.seq += 1
        }
        if let rule = profile.autoTopUp, before >= rule.belowNanos && after < rule.belowNanos {
            effects.topUps.append(TopUpRequest(wallet: key, rule: rule, balanceNanos: after, requestedAt: time, position: position, seq: effects.seq))
            effects.seq += 1
        }
        let blocked = profile.overage.blocks(balanceNanos: after)
        if blocked != wallet.blocked {
            wallet.blocked = blocked
            wallet.blockedSince = blocked ? time : nil
        }
        effects.wallets[key] = wallet
    }
}

/// Why a record changes nothing: its arithmetic would leave the range Tally stores, or (a void)
/// there is nothing for it to act on.
struct RatingRefusal: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}

/// A record the rater kept aside instead of applying: it changed no charge, wallet or ledger.
public struct UnrateableRecord: Sendable {
    public let record: RaterRecord
    /// Names the quantity or amount and the limit it would pass.
    public let reason: String
}

/// One record's effects, worked out before any of them lands in the state: the customer's
/// wallets (copied), the charge totals it moves, and what it appends.
private struct RecordEffects {
    private(set) var profile = BillingProfile(customerID: "")
    private(set) var walletKeys: [WalletKey] = []
    var wallets: [WalletKey: WalletState] = [:]
    var charges: [(ChargeKey, ChargeTotal)] = []
    var ledgerEntries: [LedgerEntry] = []
    var alerts: [BalanceAlert] = []
    var topUps: [TopUpRequest] = []
    var touchedWallets: Set<WalletKey> = []
    var grantsCredited = 0
    var seq: Int32 = 0
    var charged: (currency: Currency, nanos: Int64)?

    /// Starts on a record of `customerID`, forgetting the last one's effects (keeping capacity).
    /// Holds no reference to `state`'s tables: landing must not copy them.
    mutating func start(customerID: String, state: RatingState) {
        profile = state.profile(customerID)
        walletKeys = state.walletKeys(of: customerID)
        wallets.removeAll(keepingCapacity: true)
        for key in walletKeys { wallets[key] = state[wallet: key] }
        charges.removeAll(keepingCapacity: true)
        ledgerEntries.removeAll(keepingCapacity: true)
        alerts.removeAll(keepingCapacity: true)
        topUps.removeAll(keepingCapacity: true)
        touchedWallets.removeAll(keepingCapacity: true)
        grantsCredited = 0
        seq = 0
        charged = nil
    }

    /// The total as this record has moved it so far, else as stored.
    func total(_ key: ChargeKey, stored: [ChargeKey: ChargeTotal], currency: Currency) -> ChargeTotal {
        if let moved = charges.last(where: { $0.0 == key }) { return moved.1 }
        return stored[key] ?? ChargeTotal(quantity: 0, amountNanos: 0, currency: currency)
    }

    mutating func ledger(_ entry: LedgerEntry) {
        ledgerEntries.append(entry)
        seq += 1
    }

    /// Moves the effects into the state and the batch's result.
    func land(in state: inout RatingState, result: inout RatingResult) {
        for (key, total) in charges {
            state.charges[key] = total
            result.touchedCharges.insert(key)
        }
        for key in touchedWallets { state[wallet: key] = wallets[key] }
        result.touchedWallets.formUnion(touchedWallets)
        result.ledger += ledgerEntries
        result.alerts += alerts
        result.topUps += topUps
        result.grantsCredited += grantsCredited
    }
}
