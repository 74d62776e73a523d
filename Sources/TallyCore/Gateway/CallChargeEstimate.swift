/// What the gateway holds for a call: its tokens at the customer's prices in force now, each at
/// the highest rate it could be charged (see `PricingModel.marginalCeiling`). The rater's
/// debit, computed later from the cumulative quantities, is exact; this only has to be safe.
public enum CallChargeEstimate {
    public static func nanos(_ counts: TokenCounts, model: String, customer: BillingProfile, catalog: PriceCatalog, at time: EventTime) -> Int64 {
        guard let match = catalog.match(customerID: customer.customerID, plan: customer.plan, model: model, at: time) else {
            // An unpriced model is kept aside by the rater, not debited.
            return 0
        }
        let event = UsageEvent(id: "", source: "", subject: customer.customerID, time: time, model: model,
                               inputTokens: counts.input, outputTokens: counts.output, cacheReadInputTokens: counts.cacheRead,
                               cacheWriteInputTokens: counts.cacheWrite, reasoningOutputTokens: counts.reasoning)
        var total: Int64 = 0
        for (type, quantity) in match.prices.quantities(event) {
            if let pricing = match.prices.prices[type] { total += pricing.marginalCeiling(quantity) }
        }
        return total
    }
}
