/// What the gateway holds for a call: its tokens at the customer's prices in force now, each at
/// the highest rate it could be charged (see `PricingModel.marginalCeiling`). The rater's
/// debit, computed later from the cumulative quantities, is exact; this only has to be safe, so
/// it saturates at `Money.maxNanos` (a hold that large refuses the call) instead of trapping.
public enum CallChargeEstimate {
    /// Nil when no price book prices `model` for the customer at `time` (see `UnpricedModelPolicy`).
    /// - Parameter call: the answered call's event, whose labels and properties pick the price
    ///   rule that applies; nil before the call, when its service tier and status are not known
    ///   yet: then the dearest of the base prices and every rule's.
    public static func nanos(_ counts: TokenCounts, model: String, customer: BillingProfile, catalog: PriceCatalog, at time: EventTime,
                             call: UsageEvent? = nil) -> Int64? {
        guard let match = catalog.match(customerID: customer.customerID, plan: customer.plan, model: model, at: time) else { return nil }
        let event = UsageEvent(id: "", source: "", subject: customer.customerID, time: time, model: model,
                               provider: call?.provider, feature: call?.feature, environment: call?.environment,
                               inputTokens: counts.input, outputTokens: counts.output, cacheReadInputTokens: counts.cacheRead,
                               cacheWriteInputTokens: counts.cacheWrite, cacheWrite1hInputTokens: counts.cacheWrite1h,
                               reasoningOutputTokens: counts.reasoning, properties: call?.properties ?? [:])
        let candidates = call == nil ? match.prices.allRulePrices : [match.prices.resolve(for: event).prices]
        return candidates.map { prices in
            var total: Int64 = 0
            // The input size is itself an estimate: each token type at the dearest of the model's
            // context tiers, so a request that turns out larger is still covered.
            let tiers = prices.allTierPrices
            for (type, quantity) in ModelPrices.quantities(event, prices: prices.applicable(to: event).prices) {
                let ceiling = tiers.compactMap { $0[type]?.marginalCeiling(quantity) }.max() ?? 0
                total = Money.saturatingAdd(total, ceiling)
            }
            return total
        }.max()!
    }
}

/// What the gateway does with a call to a model no price book prices, for a customer whose
/// overage policy can refuse. The rater keeps such usage aside unbilled (until the model is
/// priced), so without a hold the call would be free however little credit is left.
public enum UnpricedModelPolicy: Sendable, Equatable {
    /// Hold every token (input and output) at this price per million tokens, in nano-units of
    /// the customer's currency.
    case hold(nanosPerMillionTokens: Int64)
    /// Refuse the call (402).
    case refuse

    /// The hold for `counts`, rounded up and saturating at `Money.maxNanos`; nil under `.refuse`.
    public func holdNanos(_ counts: TokenCounts) -> Int64? {
        guard case .hold(let perMillion) = self else { return nil }
        let tokens = Int128(max(counts.input, 0)) + Int128(max(counts.output, 0))
        let nanos = (tokens * Int128(max(perMillion, 0)) + 999_999) / 1_000_000
        return nanos > Int128(Money.maxNanos) ? Money.maxNanos : Int64(nanos)
    }
}
