/// What the gateway holds for a call: its tokens at the customer's prices in force now, each at
/// the highest rate it could be charged (see `PricingModel.marginalCeiling`). The rater's
/// debit, computed later from the cumulative quantities, is exact; this only has to be safe, so
/// it saturates at `Money.maxNanos` (a hold that large refuses the call) instead of trapping.
public enum CallChargeEstimate {
    public static func nanos(_ counts: TokenCounts, model: String, customer: BillingProfile, catalog: PriceCatalog, at time: EventTime) -> Int64 {
        guard let match = catalog.match(customerID: customer.customerID, plan: customer.plan, model: model, at: time) else {
            // An unpriced model is kept aside by the rater, not debited.
            return 0
        }
        let event = UsageEvent(id: "", source: "", subject: customer.customerID, time: time, model: model,
                               inputTokens: counts.input, outputTokens: counts.output, cacheReadInputTokens: counts.cacheRead,
                               cacheWriteInputTokens: counts.cacheWrite, cacheWrite1hInputTokens: counts.cacheWrite1h,
                               reasoningOutputTokens: counts.reasoning)
        var total: Int64 = 0
        // The input size is itself an estimate: each token type at the dearest of the model's
        // context tiers, so a request that turns out larger is still covered.
        let tiers = match.prices.allTierPrices
        for (type, quantity) in ModelPrices.quantities(event, prices: match.prices.applicable(to: event).prices) {
            let ceiling = tiers.compactMap { $0[type]?.marginalCeiling(quantity) }.max() ?? 0
            total = Money.saturatingAdd(total, ceiling)
        }
        return total
    }
}
