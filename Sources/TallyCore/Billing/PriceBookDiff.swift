/// Per model and token type: added, removed, changed.
public enum PriceBookDiff {
    /// One line per change, in a fixed order; `["no differences"]` when there is none.
    public static func lines(from a: PriceBook, to b: PriceBook) -> [String] {
        var lines: [String] = []
        if a.effectiveFrom != b.effectiveFrom { lines.append("effective_from: \(a.effectiveFrom) → \(b.effectiveFrom)") }
        if a.currency != b.currency { lines.append("currency: \(a.currency) → \(b.currency)") }
        if a.minimumPerPeriodNanos != b.minimumPerPeriodNanos {
            lines.append("minimum_per_period: \(a.minimumPerPeriodNanos.map { Money.format(nanos: $0) } ?? "none") → \(b.minimumPerPeriodNanos.map { Money.format(nanos: $0) } ?? "none")")
        }
        let old = Dictionary(uniqueKeysWithValues: a.models.map { ($0.model, $0) })
        let new = Dictionary(uniqueKeysWithValues: b.models.map { ($0.model, $0) })
        for model in Set(old.keys).union(new.keys).sorted() {
            switch (old[model], new[model]) {
            case (nil, let added?): lines.append("+ \(model): \(describe(added, b.currency))")
            case (let removed?, nil): lines.append("- \(model): \(describe(removed, a.currency))")
            case (let before?, let after?):
                for type in TokenType.tokens where before.prices[type] != after.prices[type] {
                    lines.append("~ \(model) \(type.rawValue): \(before.prices[type]?.describe(a.currency) ?? "unset") → \(after.prices[type]?.describe(b.currency) ?? "unset")")
                }
                if before.aliases != after.aliases { lines.append("~ \(model) aliases: \(before.aliases) → \(after.aliases)") }
                lines += ruleLines(model, before.rules, after.rules) { rule, currency in describe(rule.prices, currency) }
            case (nil, nil): break
            }
        }
        for meter in Set(a.meters.map(\.meter)).union(b.meters.map(\.meter)).sorted() {
            let before = a.meterPrice(meter), after = b.meterPrice(meter)
            if before?.pricing != after?.pricing {
                let text = { (price: PricingModel?, currency: Currency) in price?.describeMeter(currency, unit: "unit") ?? "unset" }
                lines.append(before == nil ? "+ meter \(meter): \(text(after?.pricing, b.currency))"
                             : after == nil ? "- meter \(meter): \(text(before?.pricing, a.currency))"
                             : "~ meter \(meter): \(text(before?.pricing, a.currency)) → \(text(after?.pricing, b.currency))")
            }
            lines += ruleLines("meter \(meter)", before?.rules ?? [], after?.rules ?? []) { rule, currency in
                rule.prices.describeMeter(currency, unit: "unit")
            }
        }
        return lines.isEmpty ? ["no differences"] : lines

        /// Rules added, removed or changed (conditions or prices), by name.
        func ruleLines<P>(_ subject: String, _ old: [PriceRule<P>], _ new: [PriceRule<P>],
                          describe: (PriceRule<P>, Currency) -> String) -> [String] {
            func text(_ rule: PriceRule<P>, _ currency: Currency) -> String {
                "when " + rule.conditions.map { "\($0.dimension)=\($0.values.joined(separator: "|"))" }.joined(separator: ", ")
                    + ": " + describe(rule, currency)
            }
            return Set(old.map(\.name)).union(new.map(\.name)).sorted().compactMap { name in
                let before = old.first { $0.name == name }, after = new.first { $0.name == name }
                switch (before, after) {
                case (nil, let added?): return "+ \(subject) rule \(name): \(text(added, b.currency))"
                case (let removed?, nil): return "- \(subject) rule \(name): \(text(removed, a.currency))"
                case (let before?, let after?) where before != after || a.currency != b.currency:
                    return "~ \(subject) rule \(name): \(text(before, a.currency)) → \(text(after, b.currency))"
                default: return nil
                }
            }
        }
    }

    static func describe(_ model: ModelPrices, _ currency: Currency) -> String {
        TokenType.tokens.compactMap { type in model.prices[type].map { "\(type.rawValue) \($0.describe(currency))" } }.joined(separator: "; ")
    }
}
