import Logging
import Metrics
import TallyCore
import TallyPostgres

/// SQL for a bigint of microseconds since the epoch as an exact timestamptz.
let microsecondsToTimestamp = "'epoch'::timestamptz + interval '1 microsecond' *"
/// SQL for a timestamptz column as exact microseconds since the epoch.
public func microseconds(_ column: String) -> String { "(extract(epoch FROM \(column)) * 1000000)::bigint" }

/// The Kafka header `tally pricing rate-unpriced` marks the unpriced events it sends again with.
public let rateUnpricedHeader = "tally-rate-unpriced"

/// The rater's state in PostgreSQL: its dedup keys, rated usage, wallets and ledger, alerts.
///
/// Every batch rates in memory (`RatingEngine`, pure) and writes absolute values back, in the
/// transaction that moves its offsets. One customer lives on one partition, so no other
/// instance writes the same rows while this one owns the partition (invariant 3). That is
/// what lets the state read from PostgreSQL stay cached between batches: it is dropped on
/// every claim, fencing, resync or failed commit, and then read again.
public final class RaterStore: ConsumerStore, @unchecked Sendable {
    public let tables: ConsumerTables
    private let catalogStore: BillingCatalogStore
    private let logger: Logger
    private var catalogStamp: String?
    private var engine = RatingEngine(catalog: PriceCatalog(books: []))
    /// What this instance knows of its customers' charges, wallets and settings.
    private var state = RatingState()
    /// The `state_version` of each partition the cached state was read under.
    private var stateVersions: [Int32: Int64] = [:]
    /// Charge totals that have a row in PostgreSQL, by its id (updated in place; the others are inserted).
    private var storedCharges: [ChargeKey: Int64] = [:]
    /// Customers whose settings and wallets are in `state` (with or without a stored row).
    private var cachedCustomers = Set<String>()
    private var customersStamp: String?
    /// (model, billing period) pairs whose first unpriced event this process has logged.
    private var unpricedLogged = Set<String>()
    /// Pricing descriptions, computed once each.
    private var pricingText: [PriceItem: String] = [:]
    /// Budgets and their usage of the customers in `budgetCustomers` (with or without budgets).
    private var budgets = BudgetState()
    private var budgetCustomers = Set<String>()
    /// Anomaly watches' hours whose baseline hours are all in `budgets.usage` (absent ones are 0).
    private var loadedBaselines = Set<BudgetUsageKey>()
    /// Budget alerts raised, by kind; made at zero, so the first of a kind is an increase Prometheus sees.
    private let budgetAlertCounters = Dictionary(uniqueKeysWithValues: BudgetAlert.Kind.allCases.map {
        ($0, Counter(label: "tally_budget_alerts_total", dimensions: [("kind", $0.rawValue)]))
    })
    /// Past this many cached charge totals the cache starts over (it refills from PostgreSQL).
    private let maxCachedCharges = 2_000_000

    private var connection: PostgresConnection { tables.connection }

    /// - Parameter creditHorizon: for the live rater, the horizon it records and fills on each
    ///   claim (see `CreditSigningHorizon`); nil for a replay, which reads the recorded one.
    private let creditHorizon: CreditSigningHorizon?

    public init(connection: PostgresConnection, group: String, topic: String, instanceID: String, logger: Logger,
                creditHorizon: CreditSigningHorizon? = nil) {
        tables = ConsumerTables(connection: connection, group: group, topic: topic, instanceID: instanceID)
        catalogStore = BillingCatalogStore(connection: connection)
        self.logger = logger
        self.creditHorizon = creditHorizon
    }

    public func recordLogGap(partition: Int32, storedOffset: Int64, logEnd: Int64) throws {
        try tables.recordLogGap(partition: partition, storedOffset: storedOffset, logEnd: logEnd)
    }

    public func recordedLogGaps(_ partitions: [Int32]) throws -> [Int32: Int64] { try tables.recordedLogGaps(partitions) }

    public func claim(_ partitions: [Int32]) throws -> [Int32: PartitionClaim] {
        // Rows of newly owned customers may have been written by their previous owner.
        forgetState()
        return try tables.claim(partitions) { connection, claims in
            guard let horizon = creditHorizon, !claims.isEmpty else { return }
            // The first claim of a partition by a rater that checks signatures records where its
            // group stands: credit before that was applied unsigned (by an older rater, now fenced
            // by this claim) and stays applied, in replays too. Later claims find the row.
            let sorted = claims.sorted { $0.key < $1.key }
            // DO UPDATE of nothing, so that the row comes back whether this claim made it or not
            // (DO NOTHING returns nothing for a row another transaction made meanwhile).
            let rows = try connection.query("""
                INSERT INTO tally.unsigned_credit_horizon (topic, partition, signed_from_offset)
                SELECT $1, partition, next_offset FROM unnest($2::int[], $3::bigint[]) AS c(partition, next_offset)
                ON CONFLICT (topic, partition) DO UPDATE SET topic = EXCLUDED.topic
                RETURNING partition, signed_from_offset
                """, [tables.topic, PostgresArray(sorted.map(\.key)), PostgresArray(sorted.map(\.value.nextOffset))])
            for row in 0..<rows.rowCount {
                horizon.set(Int32(try rows.value(row, 0, as: Int64.self)), try rows.value(row, 1, as: Int64.self))
            }
        }
    }

    private func forgetState() {
        state = RatingState()
        stateVersions.removeAll()
        storedCharges.removeAll()
        cachedCustomers.removeAll()
        budgets = BudgetState()
        budgetCustomers.removeAll()
        loadedBaselines.removeAll()
    }

    /// Applies a batch in one transaction; steps 1 and 6 are in `ConsumerTables.commit`.
    public func commit(_ batch: PreparedBatch) throws -> CommitOutcome {
        try forgetProfilesIfChanged()
        if state.charges.count > maxCachedCharges || budgets.usage.count > maxCachedCharges { forgetState() }
        do {
            let outcome = try tables.commit(batch, discardAttempt: forgetState) { _, versions in
                // A replay promoted new state under us: what is cached is stale.
                if versions.contains(where: { partition, version in stateVersions[partition].map { $0 != version } ?? false }) { forgetState() }
                stateVersions.merge(versions) { $1 }
                // Read after the offset rows are locked: a promote that committed while this
                // batch waited for them added its price books, and the batch lands after the
                // handover, so it is rated with them (read before the lock, it kept the old ones).
                try reloadCatalogIfChanged()
                return try apply(batch)
            }
            if case .committed = outcome {} else { forgetState() }
            return outcome
        } catch {
            // The engine already changed `state` for a transaction that did not commit.
            forgetState()
            throw error
        }
    }

    private func apply(_ batch: PreparedBatch) throws -> DedupSummary {
        // 2. Dedup usage and grants together, in log order.
        let grants = batch.grants
        let records = (batch.events.map(RaterRecord.usage) + grants.map(RaterRecord.grant) + batch.voids.map(RaterRecord.grantVoid)
                       + batch.budgets.map(RaterRecord.budget))
            .sorted { $0.position < $1.position }
        let stored = try tables.storedHashes(of: records, table: "rater_event_keys")
        let decision = Deduplicator.decide(records, stored: stored)
        let retried = try unpricedSentAgain(records, batch: batch, decision: decision)
        let rated = retried.isEmpty ? decision.accepted : (decision.accepted + retried).sorted { $0.position < $1.position }
        // 3. Load what is not cached yet; then rate (pure) while the keys go in; write the
        //    changed state back. A failed key COPY discards the rated state (`discardAttempt`).
        let customers = Set(rated.map(\.customerID))
        try loadCustomers(customers.subtracting(cachedCustomers))
        try loadBudgets(customers.subtracting(budgetCustomers), accepted: decision.accepted)
        let priced = engine.price(rated, profiles: state.profiles)
        try loadCharges(engine.missingChargeKeys(priced, in: state))
        let result = try tables.storeKeys(decision.accepted, table: "rater_event_keys") { engine.apply(priced, to: &state) }
        try writeCharges(result.touchedCharges)
        try appendLedger(result.ledger)
        try writeWallets(result.touchedWallets)
        // Budgets count the batch's first sightings (a rate-unpriced copy was counted when first read).
        let budgetResult = BudgetEngine.apply(decision.accepted, charges: result.charged, skipped: Set(result.unrateable.map(\.record.position)),
                                              profiles: state.profiles, to: &budgets)
        try writeBudgets(budgetResult)
        try insertUnrateable(budgetResult.refused)
        // 4. Alerts, top-up requests and unpriced usage: ids derive from log positions,
        //    so a batch that is re-applied after a lost COMMIT reply cannot add them twice.
        try insertAlerts(result.alerts)
        try insertTopUps(result.topUps)
        try insertUnpriced(result.unpriced)
        logFirstUnpriced(result.unpriced)
        try removeRatedUnpriced(retried, priced: priced)
        try insertUnrateable(result.unrateable)
        // 5. Conflicts and dead letters, idempotent by position.
        try tables.insertConflicts(decision.conflicts)
        try tables.insertDeadLetters(batch.deadLetters)
        return DedupSummary(accepted: decision.accepted.count, duplicates: decision.duplicates, conflicts: decision.conflicts,
                            deadLetters: batch.deadLetters.count, grants: result.grantsCredited, unpriced: result.unpriced.count,
                            unrateable: result.unrateable.map { "\($0.record.customerID) \($0.record.key.eventID) at \($0.record.position.partition)-\($0.record.position.offset): \($0.reason)" })
    }

    /// Reads the budgets of `customers` and the usage the batch's records may touch.
    private func loadBudgets(_ customers: Set<String>, accepted: [RaterRecord]) throws {
        if !customers.isEmpty {
            let list = Array(customers)
            let rows = try connection.query("""
                SELECT \(BudgetRow.columns) FROM budgets WHERE customer_id = ANY($1::text[])
                """, [PostgresArray(list)])
            for customer in list where budgets.budgets[customer] == nil { budgets.budgets[customer] = [:] }
            for row in 0..<rows.rowCount {
                let declared = try BudgetRow.decode(rows, row: row)
                budgets.budgets[declared.customerID, default: [:]][declared.budget.definition.name] = declared.budget
            }
            budgetCustomers.formUnion(customers)
        }
        // Charges are listed for customers with budgets, or about to have one.
        var budgeted = Set(budgets.budgets.compactMap { $0.value.isEmpty ? nil : $0.key })
        for case .budget(let positioned) in accepted { budgeted.insert(positioned.budget.subject) }
        state.budgetedCustomers = budgeted
        guard !budgeted.isEmpty else { return }
        let wanted = BudgetEngine.keysToLoad(accepted, state: budgets, profiles: state.profiles)
        try loadBaselines(wanted.baselines.subtracting(loadedBaselines))
        let missing = wanted.usage.filter { budgets.usage[$0] == nil }
        guard !missing.isEmpty else { return }
        let keys = Array(missing)
        let rows = try connection.query("""
            SELECT k.i, u.used FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) WITH ORDINALITY AS k(c, b, p, v, i)
            JOIN budget_usage u ON u.customer_id = k.c AND u.budget = k.b AND u.period_start = \(microsecondsToTimestamp) k.p
             AND md5(u.value) = md5(k.v) AND u.value = k.v
            """, [PostgresArray(keys.map(\.budget.customerID)), PostgresArray(keys.map(\.budget.name)), PostgresArray(keys.map(\.period.start)),
                  PostgresArray(keys.map(\.value))])
        for key in keys { budgets.usage[key] = 0 }
        for row in 0..<rows.rowCount {
            budgets.usage[keys[Int(try rows.value(row, 0, as: Int64.self)) - 1]] = try rows.value(row, 1, as: Int64.self)
        }
    }

    /// The stored hours before each anomaly watch's hour in `hours` (one range query for all:
    /// only hours with usage come back, so a watch per run costs what its runs used).
    private func loadBaselines(_ hours: Set<BudgetUsageKey>) throws {
        guard !hours.isEmpty else { return }
        let list = Array(hours)
        let spans = list.map { key -> Int64 in
            let rule = budgets.budgets[key.budget.customerID]?[key.budget.name]?.definition.anomaly
            return Int64(rule?.baselineHours ?? AnomalyRule.baselineRange.upperBound) * (key.period.end - key.period.start)
        }
        let rows = try connection.query("""
            SELECT u.customer_id, u.budget, u.value, \(microseconds("u.period_start")), \(microseconds("u.period_end")), u.used
            FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS k(c, b, v, s, w)
            JOIN budget_usage u ON u.customer_id = k.c AND u.budget = k.b AND md5(u.value) = md5(k.v) AND u.value = k.v
             AND u.period_start >= \(microsecondsToTimestamp) (k.s - k.w) AND u.period_start < \(microsecondsToTimestamp) k.s
            """, [PostgresArray(list.map(\.budget.customerID)), PostgresArray(list.map(\.budget.name)), PostgresArray(list.map(\.value)),
                  PostgresArray(list.map(\.period.start)), PostgresArray(spans)])
        for row in 0..<rows.rowCount {
            let key = BudgetUsageKey(budget: BudgetKey(customerID: try rows.value(row, 0, as: String.self), name: try rows.value(row, 1, as: String.self)),
                                     period: BillingPeriod(start: try rows.value(row, 3, as: Int64.self), end: try rows.value(row, 4, as: Int64.self)),
                                     value: try rows.value(row, 2, as: String.self))
            // What is in memory is what was committed (or this batch's own, newer) count.
            if budgets.usage[key] == nil { budgets.usage[key] = try rows.value(row, 5, as: Int64.self) }
        }
        loadedBaselines.formUnion(hours)
    }

    private func writeBudgets(_ result: BudgetResult) throws {
        let touched = result.touchedBudgets.sorted()
        let kept = touched.compactMap { key in budgets.budgets[key.customerID]?[key.name].map { (key, $0) } }
        let removed = touched.filter { budgets.budgets[$0.customerID]?[$0.name] == nil }
        if !removed.isEmpty {
            try connection.query("""
                DELETE FROM budgets b USING unnest($1::text[], $2::text[]) AS k(c, n) WHERE b.customer_id = k.c AND b.budget = k.n
                """, [PostgresArray(removed.map(\.customerID)), PostgresArray(removed.map(\.name))])
        }
        if !kept.isEmpty {
            let definitions = kept.map(\.1.definition)
            try connection.query("""
                INSERT INTO budgets (customer_id, budget, period, measure, unit, limit_value, alert_at, enforced, dimensions, event_id,
                    declared_partition, declared_offset, declared_at, per, anomaly_factor_percent, baseline_hours)
                SELECT c, n, pe, m, u, l, string_to_array(a, ',')::int[], en, d::jsonb, e, dp, o, \(microsecondsToTimestamp) t, pr, af, bh
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::bool[], $9::text[],
                            $10::text[], $11::int[], $12::bigint[], $13::bigint[], $14::text[], $15::int[], $16::int[])
                    AS x(c, n, pe, m, u, l, a, en, d, e, dp, o, t, pr, af, bh)
                ON CONFLICT (customer_id, budget) DO UPDATE SET period = EXCLUDED.period, measure = EXCLUDED.measure, unit = EXCLUDED.unit,
                    limit_value = EXCLUDED.limit_value, alert_at = EXCLUDED.alert_at, enforced = EXCLUDED.enforced, dimensions = EXCLUDED.dimensions,
                    per = EXCLUDED.per, anomaly_factor_percent = EXCLUDED.anomaly_factor_percent, baseline_hours = EXCLUDED.baseline_hours,
                    event_id = EXCLUDED.event_id, declared_partition = EXCLUDED.declared_partition, declared_offset = EXCLUDED.declared_offset,
                    declared_at = EXCLUDED.declared_at
                """, [PostgresArray(kept.map(\.0.customerID)), PostgresArray(kept.map(\.0.name)), PostgresArray(definitions.map(\.period.rawValue)),
                      PostgresArray(definitions.map(\.measure.kind)), PostgresArray(definitions.map(\.measure.unit)), PostgresArray(definitions.map(\.limit)),
                      PostgresArray(definitions.map { $0.alertAt.map(String.init).joined(separator: ",") }),
                      PostgresArray(definitions.map { $0.enforced ? "t" : "f" }), PostgresArray(definitions.map(BudgetRow.dimensionsJSON)),
                      PostgresArray(kept.map(\.1.eventID)), PostgresArray(kept.map(\.1.declaredAt.partition)),
                      PostgresArray(kept.map(\.1.declaredAt.offset)), PostgresArray(kept.map(\.1.declaredTime.microseconds)),
                      PostgresArray(definitions.map(\.per)), PostgresArray(definitions.map { $0.anomaly.map { String($0.factorPercent) } }),
                      PostgresArray(definitions.map { $0.anomaly.map { String($0.baselineHours) } })])
        }
        if !result.clearedUsage.isEmpty {
            let cleared = result.clearedUsage.sorted()
            try connection.query("""
                DELETE FROM budget_usage u USING unnest($1::text[], $2::text[]) AS k(c, n) WHERE u.customer_id = k.c AND u.budget = k.n
                """, [PostgresArray(cleared.map(\.customerID)), PostgresArray(cleared.map(\.name))])
        }
        if !result.touchedUsage.isEmpty {
            let keys = result.touchedUsage.sorted()
            try connection.query("""
                INSERT INTO budget_usage (customer_id, budget, period_start, value, period_end, used)
                SELECT c, n, \(microsecondsToTimestamp) s, v, \(microsecondsToTimestamp) e, u
                FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[]) AS x(c, n, s, v, e, u)
                ON CONFLICT (customer_id, budget, period_start, md5(value)) DO UPDATE SET used = EXCLUDED.used
                """, [PostgresArray(keys.map(\.budget.customerID)), PostgresArray(keys.map(\.budget.name)), PostgresArray(keys.map(\.period.start)),
                      PostgresArray(keys.map(\.value)), PostgresArray(keys.map(\.period.end)), PostgresArray(keys.map { budgets.usage[$0] ?? 0 })])
        }
        guard !result.alerts.isEmpty else { return }
        let alerts = result.alerts
        // Counted when written (a batch applied again after a lost COMMIT reply may count twice).
        for alert in alerts { budgetAlertCounters[alert.kind]!.increment() }
        try connection.query("""
            INSERT INTO budget_alerts (alert_id, customer_id, budget, kind, percent, measure, unit, used, limit_value, enforced, dimensions,
                period_start, period_end, crossed_at, partition, record_offset, per, value, baseline, anomaly_factor_percent, baseline_hours)
            SELECT id, c, n, k, pc, m, u, us, l, en, d::jsonb, \(microsecondsToTimestamp) s, \(microsecondsToTimestamp) e, \(microsecondsToTimestamp) t, p, o,
                   pr, v, b, af, bh
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bool[],
                        $11::text[], $12::bigint[], $13::bigint[], $14::bigint[], $15::int[], $16::bigint[], $17::text[], $18::text[],
                        $19::bigint[], $20::int[], $21::int[])
                AS x(id, c, n, k, pc, m, u, us, l, en, d, s, e, t, p, o, pr, v, b, af, bh)
            ON CONFLICT DO NOTHING
            """, [PostgresArray(alerts.map(\.alertID)), PostgresArray(alerts.map(\.budget.customerID)), PostgresArray(alerts.map(\.budget.name)),
                  PostgresArray(alerts.map(\.kind.rawValue)), PostgresArray(alerts.map(\.percent)), PostgresArray(alerts.map(\.definition.measure.kind)),
                  PostgresArray(alerts.map(\.definition.measure.unit)), PostgresArray(alerts.map(\.used)), PostgresArray(alerts.map(\.definition.limit)),
                  PostgresArray(alerts.map { $0.definition.enforced ? "t" : "f" }), PostgresArray(alerts.map { BudgetRow.dimensionsJSON($0.definition) }),
                  PostgresArray(alerts.map(\.period.start)), PostgresArray(alerts.map(\.period.end)), PostgresArray(alerts.map(\.crossedAt)),
                  PostgresArray(alerts.map(\.position.partition)), PostgresArray(alerts.map(\.position.offset)),
                  PostgresArray(alerts.map(\.definition.per)), PostgresArray(alerts.map(\.value)), PostgresArray(alerts.map { $0.baseline.map(String.init) }),
                  PostgresArray(alerts.map { $0.definition.anomaly.map { String($0.factorPercent) } }),
                  PostgresArray(alerts.map { $0.definition.anomaly.map { String($0.baselineHours) } })])
    }

    /// Settings changed by `tally customers set` apply from the next batch on.
    private func forgetProfilesIfChanged() throws {
        let stamp = try connection.query("SELECT count(*)::text || '/' || coalesce(max(updated_at)::text, '') FROM customers").scalar
        if stamp != customersStamp {
            state.profiles.removeAll()
            cachedCustomers.removeAll()
            customersStamp = stamp
        }
    }

    private func loadCustomers(_ customers: Set<String>) throws {
        guard !customers.isEmpty else { return }
        let list = Array(customers)
        for (customer, profile) in try catalogStore.profiles(list) { state.profiles[customer] = profile }
        // Wallets already in the state are newer than the stored rows.
        try loadWallets(list.filter { !state.hasWallets(of: $0) })
        cachedCustomers.formUnion(customers)
    }

    /// Price books (and the meter catalog) are read once and again whenever one is applied.
    private func reloadCatalogIfChanged() throws {
        let meterStore = MeterCatalogStore(connection: connection)
        let stamp = try catalogStore.catalogStamp() + "/meters \(try meterStore.latestVersion())"
        guard stamp != catalogStamp else { return }
        let catalog = try catalogStore.loadCatalog()
        engine = RatingEngine(catalog: catalog, meters: try meterStore.latest()?.catalog ?? MeterCatalog([]))
        catalogStamp = stamp
        logger.info("price catalog loaded: \(catalog.books.count) book versions")
    }

    private func loadCharges(_ keys: Set<ChargeKey>) throws {
        guard !keys.isEmpty else { return }
        let list = Array(keys)
        let result = try connection.query("""
            SELECT \(chargeKeyColumns), r.currency, r.quantity, r.amount_nanos, r.id
            FROM rated_usage r
            JOIN unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::bigint[], $9::text[])
                AS k(c, p, b, bc, v, m, t, ca, pr)
              ON r.customer_id = k.c AND r.period_start = \(microsecondsToTimestamp) k.p AND r.book_name = k.b
             AND r.book_customer = k.bc AND r.book_version = k.v AND r.model = k.m AND r.token_type = k.t AND r.context_above = k.ca
             AND r.price_rule = k.pr
            """, chargeKeyArrays(list))
        for row in 0..<result.rowCount {
            let key = try chargeKey(result, row: row, from: 0)
            state.charges[key] = ChargeTotal(quantity: try result.value(row, 10, as: Int64.self), amountNanos: try result.value(row, 11, as: Int64.self),
                                             currency: try result.value(row, 9, parsedBy: Currency.init))
            storedCharges[key] = try result.value(row, 12, as: Int64.self)
        }
    }

    /// `rated_usage`'s key columns (unqualified), in the order `chargeKey(_:row:from:)` reads them.
    private let chargeKeyColumns = "customer_id, \(microseconds("period_start")), book_name, book_customer, book_version, model, token_type, context_above, price_rule"

    /// The charge key in the nine `chargeKeyColumns` of a result row, starting at column `first`.
    private func chargeKey(_ result: PostgresResult, row: Int, from first: Int) throws -> ChargeKey {
        let item = PriceItem(bookName: try result.value(row, first + 2, as: String.self), bookCustomer: try result.value(row, first + 3, as: String.self),
                             bookVersion: Int(try result.value(row, first + 4, as: Int64.self)), model: try result.value(row, first + 5, as: String.self),
                             tokenType: try result.value(row, first + 6, parsedBy: TokenType.init(rawValue:)), contextAbove: try result.value(row, first + 7, as: Int64.self),
                             rule: try result.value(row, first + 8, as: String.self))
        return ChargeKey(customerID: try result.value(row, first, as: String.self), periodStart: try result.value(row, first + 1, as: Int64.self), item: item)
    }

    private func chargeKeyArrays(_ keys: [ChargeKey]) -> [(any PostgresEncodable)?] {
        [PostgresArray(keys.map(\.customerID)), PostgresArray(keys.map(\.periodStart)), PostgresArray(keys.map(\.item.bookName)),
         PostgresArray(keys.map(\.item.bookCustomer)), PostgresArray(keys.map(\.item.bookVersion)), PostgresArray(keys.map(\.item.model)),
         PostgresArray(keys.map(\.item.tokenType.rawValue)), PostgresArray(keys.map(\.item.contextAbove)),
         PostgresArray(keys.map(\.item.rule))]
    }

    private func writeCharges(_ touched: Set<ChargeKey>) throws {
        // Most totals exist already: a plain UPDATE by id is much cheaper than an upsert on the key.
        var existing: [(id: Int64, total: ChargeTotal)] = []
        var new: [ChargeKey] = []
        for key in touched {
            if let id = storedCharges[key] { existing.append((id, state.charges[key]!)) } else { new.append(key) }
        }
        if !existing.isEmpty {
            try connection.query("""
                UPDATE rated_usage AS r SET quantity = x.q, amount_nanos = x.a
                FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS x(id, q, a)
                WHERE r.id = x.id
                """, [PostgresArray(existing.map(\.id)), PostgresArray(existing.map(\.total.quantity)),
                      PostgresArray(existing.map(\.total.amountNanos))])
        }
        guard !new.isEmpty else { return }
        let totals = new.map { state.charges[$0]! }
        let pricing = new.map { key in
            if let text = pricingText[key.item] { return text }
            let text = engine.catalog.pricing(of: key.item).map { $0.pricing.describe(key.item, currency: $0.book.currency) } ?? ""
            pricingText[key.item] = text
            return text
        }
        // RETURNING promises no order: each id is matched to its key by the key's columns.
        let inserted = try connection.query("""
            INSERT INTO rated_usage (customer_id, period_start, book_name, book_customer, book_version, model, token_type, context_above,
                price_rule, currency, quantity, amount_nanos, pricing)
            SELECT c, \(microsecondsToTimestamp) p, b, bc, v, m, t, ca, ru, cur, q, a, pr
            FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::bigint[], $9::text[],
                        $10::text[], $11::bigint[], $12::bigint[], $13::text[]) AS x(c, p, b, bc, v, m, t, ca, ru, cur, q, a, pr)
            RETURNING id, \(chargeKeyColumns)
            """, chargeKeyArrays(new) + [PostgresArray(totals.map(\.currency.code)), PostgresArray(totals.map(\.quantity)),
                                         PostgresArray(totals.map(\.amountNanos)), PostgresArray(pricing)])
        for row in 0..<inserted.rowCount {
            storedCharges[try chargeKey(inserted, row: row, from: 1)] = try inserted.value(row, 0, as: Int64.self)
        }
    }

    private func loadWallets(_ customers: [String]) throws {
        guard !customers.isEmpty else { return }
        var wallets: [WalletKey: WalletState] = [:]
        let result = try connection.query("""
            SELECT customer_id, currency, balance_nanos, blocked, \(microseconds("blocked_since"))
            FROM wallets WHERE customer_id = ANY($1::text[])
            """, [PostgresArray(customers)])
        for row in 0..<result.rowCount {
            let key = WalletKey(customerID: try result.value(row, 0, as: String.self), currency: try result.value(row, 1, parsedBy: Currency.init))
            wallets[key] = WalletState(balanceNanos: try result.value(row, 2, as: Int64.self), blocked: try result.value(row, 3, as: Bool.self), blockedSince: try result.int64(row, 4))
        }
        let grants = try connection.query("""
            SELECT customer_id, currency, grant_id, amount_nanos, remaining_nanos, priority, \(microseconds("expires_at")),
                   \(microseconds("granted_at")), source
            FROM wallet_grants WHERE customer_id = ANY($1::text[]) AND remaining_nanos > 0
            ORDER BY customer_id, grant_id
            """, [PostgresArray(customers)])
        for row in 0..<grants.rowCount {
            let key = WalletKey(customerID: try grants.value(row, 0, as: String.self), currency: try grants.value(row, 1, parsedBy: Currency.init))
            wallets[key, default: WalletState()].grants.append(GrantBalance(
                grantID: try grants.value(row, 2, as: String.self), amountNanos: try grants.value(row, 3, as: Int64.self), remainingNanos: try grants.value(row, 4, as: Int64.self),
                priority: try grants.value(row, 5, as: Int64.self), expiresAt: try grants.int64(row, 6), grantedAt: try grants.value(row, 7, as: Int64.self),
                source: GrantSource(rawValue: try grants.value(row, 8, as: String.self)) ?? .purchase))
        }
        for (key, wallet) in wallets { state[wallet: key] = wallet }
    }

    private func writeWallets(_ touched: Set<WalletKey>) throws {
        guard !touched.isEmpty else { return }
        let keys = touched.sorted()
        let wallets = keys.map { state[wallet: $0]! }
        try connection.query("""
            INSERT INTO wallets AS w (customer_id, currency, balance_nanos, blocked, blocked_since)
            SELECT c, cur, b, bl, \(microsecondsToTimestamp) s FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bool[], $5::bigint[]) AS x(c, cur, b, bl, s)
            ON CONFLICT (customer_id, currency) DO UPDATE SET balance_nanos = EXCLUDED.balance_nanos, blocked = EXCLUDED.blocked,
                blocked_since = EXCLUDED.blocked_since
            """, [PostgresArray(keys.map(\.customerID)), PostgresArray(keys.map(\.currency.code)), PostgresArray(wallets.map(\.balanceNanos)),
                  PostgresArray(wallets.map { $0.blocked ? "t" : "f" }), PostgresArray(wallets.map { $0.blockedSince.map(String.init) })])
        let grants = keys.flatMap { key in state[wallet: key]!.grants.map { (key, $0) } }
        // Used-up grants are written once more (remaining 0), then no longer carried.
        for key in keys { state[wallet: key]!.grants.removeAll { $0.remainingNanos == 0 } }
        guard !grants.isEmpty else { return }
        try connection.query("""
            INSERT INTO wallet_grants AS g (customer_id, grant_id, currency, amount_nanos, remaining_nanos, priority, expires_at, source, granted_at)
            SELECT c, id, cur, a, r, p, \(microsecondsToTimestamp) e, s, \(microsecondsToTimestamp) t
            FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], $9::bigint[])
                AS x(c, id, cur, a, r, p, e, s, t)
            ON CONFLICT (customer_id, grant_id) DO UPDATE SET remaining_nanos = EXCLUDED.remaining_nanos
            """, [PostgresArray(grants.map(\.0.customerID)), PostgresArray(grants.map(\.1.grantID)), PostgresArray(grants.map(\.0.currency.code)),
                  PostgresArray(grants.map(\.1.amountNanos)), PostgresArray(grants.map(\.1.remainingNanos)), PostgresArray(grants.map(\.1.priority)),
                  PostgresArray(grants.map { $0.1.expiresAt.map(String.init) }), PostgresArray(grants.map(\.1.source.rawValue)),
                  PostgresArray(grants.map(\.1.grantedAt))])
    }

    /// Appends the credit movements to `wallet_ledger` and adds the charges no grant covered to
    /// their day's `wallet_overage` entry (migration 0027).
    private func appendLedger(_ all: [LedgerEntry]) throws {
        var entries: [LedgerEntry] = []
        var overage: [OverageDay: OverageTotal] = [:]
        entries.reserveCapacity(all.count)
        for entry in all {
            guard entry.kind == .usage, entry.grantID == nil, let periodStart = entry.periodStart else {
                entries.append(entry)
                continue
            }
            let day = OverageDay(wallet: entry.wallet, periodStart: periodStart, partition: entry.position.partition,
                                 day: Granularity.day.windowStart(entry.effectiveAt.microseconds) / OverageDay.microsecondsPerDay)
            overage[day, default: OverageTotal()].add(entry)
        }
        try addOverage(overage)
        guard !entries.isEmpty else { return }
        // COPY: entries are new by construction (their positions were never committed).
        try connection.copyIn("""
            COPY wallet_ledger (customer_id, currency, partition, record_offset, seq, kind, amount_nanos, grant_id, event_id, effective_at, period_start)
            FROM STDIN WITH (FORMAT binary)
            """, format: .binary, rows: entries) { entry, fields in
                fields.add(entry.wallet.customerID)
                fields.add(entry.wallet.currency.code)
                fields.add(entry.position.partition)
                fields.add(entry.position.offset)
                fields.add(entry.seq)
                fields.add(entry.kind.rawValue)
                fields.add(entry.amountNanos)
                fields.add(entry.grantID)
                fields.add(entry.eventID)
                fields.add(timestampMicroseconds: entry.effectiveAt.microseconds)
                fields.add(timestampMicroseconds: entry.periodStart)
            }
    }

    private func addOverage(_ overage: [OverageDay: OverageTotal]) throws {
        guard !overage.isEmpty else { return }
        let days = overage.keys.sorted()
        let totals = days.map { overage[$0]! }
        // Added, not written absolute: the sum over any split of the log into batches is the same.
        try connection.query("""
            INSERT INTO wallet_overage AS o (customer_id, currency, period_start, day, partition, amount_nanos, entries, first_offset, last_offset, last_effective_at)
            SELECT c, cur, \(microsecondsToTimestamp) ps, date '1970-01-01' + d, p, a, n, f, l, \(microsecondsToTimestamp) e
            FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[], $5::int[], $6::numeric[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
                AS x(c, cur, ps, d, p, a, n, f, l, e)
            ON CONFLICT (customer_id, currency, period_start, day, partition) DO UPDATE SET
                amount_nanos = o.amount_nanos + EXCLUDED.amount_nanos, entries = o.entries + EXCLUDED.entries,
                first_offset = least(o.first_offset, EXCLUDED.first_offset), last_offset = greatest(o.last_offset, EXCLUDED.last_offset),
                last_effective_at = greatest(o.last_effective_at, EXCLUDED.last_effective_at)
            """, [PostgresArray(days.map(\.wallet.customerID)), PostgresArray(days.map(\.wallet.currency.code)), PostgresArray(days.map(\.periodStart)),
                  PostgresArray(days.map(\.day)), PostgresArray(days.map(\.partition)), PostgresArray(totals.map { String($0.amountNanos) }),
                  PostgresArray(totals.map(\.entries)), PostgresArray(totals.map(\.firstOffset)), PostgresArray(totals.map(\.lastOffset)),
                  PostgresArray(totals.map(\.lastEffectiveAt))])
    }

    private func insertAlerts(_ alerts: [BalanceAlert]) throws {
        guard !alerts.isEmpty else { return }
        try connection.query("""
            INSERT INTO balance_alerts (alert_id, customer_id, currency, threshold_nanos, balance_nanos, crossed_at, partition, record_offset)
            SELECT id, c, cur, t, b, \(microsecondsToTimestamp) at, p, o
            FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::int[], $8::bigint[]) AS x(id, c, cur, t, b, at, p, o)
            ON CONFLICT DO NOTHING
            """, [PostgresArray(alerts.map(\.alertID)), PostgresArray(alerts.map(\.wallet.customerID)), PostgresArray(alerts.map(\.wallet.currency.code)),
                  PostgresArray(alerts.map(\.thresholdNanos)), PostgresArray(alerts.map(\.balanceNanos)), PostgresArray(alerts.map(\.crossedAt)),
                  PostgresArray(alerts.map(\.position.partition)), PostgresArray(alerts.map(\.position.offset))])
    }

    private func insertTopUps(_ requests: [TopUpRequest]) throws {
        guard !requests.isEmpty else { return }
        try connection.query("""
            INSERT INTO topup_requests (request_id, customer_id, currency, below_nanos, amount_nanos, balance_nanos, requested_at, partition, record_offset)
            SELECT id, c, cur, bl, a, b, \(microsecondsToTimestamp) at, p, o
            FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::int[], $9::bigint[])
                AS x(id, c, cur, bl, a, b, at, p, o)
            ON CONFLICT DO NOTHING
            """, [PostgresArray(requests.map(\.requestID)), PostgresArray(requests.map(\.wallet.customerID)),
                  PostgresArray(requests.map(\.wallet.currency.code)), PostgresArray(requests.map(\.rule.belowNanos)),
                  PostgresArray(requests.map(\.rule.amountNanos)), PostgresArray(requests.map(\.balanceNanos)),
                  PostgresArray(requests.map(\.requestedAt)), PostgresArray(requests.map(\.position.partition)),
                  PostgresArray(requests.map(\.position.offset))])
    }

    private func insertUnrateable(_ records: [UnrateableRecord]) throws {
        guard !records.isEmpty else { return }
        let kinds = records.map { record -> (String, Int64) in
            let kind = switch record.record {
            case .usage: "usage"
            case .grant: "grant"
            case .grantVoid: "void"
            case .budget: "budget"
            }
            return (kind, record.record.time.microseconds)
        }
        try connection.query("""
            INSERT INTO unrateable_records (partition, record_offset, customer_id, event_id, kind, event_time, reason)
            SELECT p, o, c, e, k, \(microsecondsToTimestamp) t, r
            FROM unnest($1::int[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[]) AS x(p, o, c, e, k, t, r)
            ON CONFLICT DO NOTHING
            """, [PostgresArray(records.map(\.record.position.partition)), PostgresArray(records.map(\.record.position.offset)),
                  PostgresArray(records.map(\.record.customerID)), PostgresArray(records.map(\.record.key.eventID)),
                  PostgresArray(kinds.map(\.0)), PostgresArray(kinds.map(\.1)), PostgresArray(records.map(\.reason))])
    }

    /// Events `tally pricing rate-unpriced` sent again whose first copy is still in `unpriced_usage`:
    /// duplicates by key (their key was stored with the first copy), rated now like new usage.
    /// In a replay with the price in force the first copy is rated where it stands, and the
    /// second finds nothing kept aside: the same charges either way.
    private func unpricedSentAgain(_ records: [RaterRecord], batch: PreparedBatch, decision: DedupDecision<RaterRecord>) throws -> [RaterRecord] {
        guard !batch.rateUnpricedAt.isEmpty else { return [] }
        let acceptedKeys = Set(decision.accepted.map(\.key))
        // A copy whose content differs from the first is a conflict: recorded, never charged.
        let conflicting = Set(decision.conflicts.map(\.position))
        var seen = Set<DedupKey>()
        let candidates = records.filter {
            guard case .usage = $0, batch.rateUnpricedAt.contains($0.position), !acceptedKeys.contains($0.key),
                  !conflicting.contains($0.position) else { return false }
            return seen.insert($0.key).inserted
        }
        guard !candidates.isEmpty else { return [] }
        let kept = try connection.query("""
            SELECT DISTINCT k.i FROM unpriced_usage u
            JOIN unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(c, s, e, i)
              ON u.customer_id = k.c AND u.event_id = k.e AND u.event_source IN (k.s, $4)
            """, [PostgresArray(candidates.map(\.key.customerID)), PostgresArray(candidates.map(\.key.source)),
                  PostgresArray(candidates.map(\.key.eventID)), DedupKey.anySource])
        let keptIndices = Set(try (0..<kept.rowCount).map { Int(try kept.value($0, 0, as: Int64.self)) - 1 })
        return candidates.indices.filter { keptIndices.contains($0) }.map { candidates[$0] }
    }

    /// The events sent again that a price book now prices leave `unpriced_usage`: they are charged.
    private func removeRatedUnpriced(_ retried: [RaterRecord], priced: [PricedRecord]) throws {
        guard !retried.isEmpty else { return }
        let retriedPositions = Set(retried.map(\.position))
        let rated = priced.filter { retriedPositions.contains($0.record.position) && $0.charge != nil }.map(\.record.key)
        guard !rated.isEmpty else { return }
        try connection.query("""
            DELETE FROM unpriced_usage u USING unnest($1::text[], $2::text[], $3::text[]) AS k(c, s, e)
            WHERE u.customer_id = k.c AND u.event_id = k.e AND u.event_source IN (k.s, $4)
            """, [PostgresArray(rated.map(\.customerID)), PostgresArray(rated.map(\.source)), PostgresArray(rated.map(\.eventID)),
                  DedupKey.anySource])
        logger.info("rated \(rated.count) usage events kept unpriced before (sent again by tally pricing rate-unpriced)")
    }

    /// One line per model and billing period, the first time this process meets it: loud enough
    /// to be seen, without a line per event.
    private func logFirstUnpriced(_ events: [PositionedEvent]) {
        for positioned in events {
            let event = positioned.event
            let period = state.profile(event.subject).period(containing: event.time.microseconds).label
            guard unpricedLogged.insert("\(event.model)\u{1}\(period)").inserted else { continue }
            logger.warning("""
                unpriced usage: no price book prices \(event.model) at \(event.time.text); its events in \(period) \
                are kept in tally.unpriced_usage, not billed (first: \(event.subject)/\(event.id))
                """)
        }
    }

    private func insertUnpriced(_ events: [PositionedEvent]) throws {
        guard !events.isEmpty else { return }
        try connection.query(bound: """
            INSERT INTO unpriced_usage (customer_id, event_id, model, event_time, partition, record_offset, input_tokens, output_tokens,
                cache_read_input_tokens, cache_write_input_tokens, reasoning_output_tokens, document, event_source)
            SELECT c, e, m, \(unescaped: microsecondsToTimestamp) t, p, o, i, out, cr, cw, r, d, s
            FROM unnest(\(PostgresArray(events.map(\.event.subject)))::text[], \(PostgresArray(events.map(\.event.id)))::text[],
                        \(PostgresArray(events.map(\.event.model)))::text[], \(PostgresArray(events.map(\.event.time.microseconds)))::bigint[],
                        \(PostgresArray(events.map(\.position.partition)))::int[], \(PostgresArray(events.map(\.position.offset)))::bigint[],
                        \(PostgresArray(events.map(\.event.inputTokens)))::bigint[], \(PostgresArray(events.map(\.event.outputTokens)))::bigint[],
                        \(PostgresArray(events.map(\.event.cacheReadInputTokens)))::bigint[],
                        \(PostgresArray(events.map(\.event.cacheWriteInputTokens)))::bigint[],
                        \(PostgresArray(events.map(\.event.reasoningOutputTokens)))::bigint[],
                        \(PostgresArray(events.map { String(decoding: EventEncoder.encode($0.event), as: UTF8.self) }))::text[],
                        \(PostgresArray(events.map(\.event.source)))::text[]) AS x(c, e, m, t, p, o, i, out, cr, cw, r, d, s)
            ON CONFLICT DO NOTHING
            """)
    }
}

extension CreditVerifier {
    /// The verifier of a replay of `topic`: `keyring` and the horizon the live rater recorded
    /// (`tally.unsigned_credit_horizon`, migration 0015).
    public static func recorded(keyring: CreditKeyring, topic: String, on connection: PostgresConnection) throws -> CreditVerifier {
        let rows = try connection.query("""
            SELECT partition, signed_from_offset FROM tally.unsigned_credit_horizon WHERE topic = $1
            """, [topic])
        var unsignedBefore: [Int32: Int64] = [:]
        for row in 0..<rows.rowCount {
            guard let partition = try rows.int64(row, 0), let offset = try rows.int64(row, 1) else { continue }
            unsignedBefore[Int32(partition)] = offset
        }
        return CreditVerifier(keyring: keyring, horizon: CreditSigningHorizon(unsignedBefore))
    }
}

/// One `wallet_overage` entry's key: a wallet's charges beyond its grants in one billing period,
/// UTC day of the event and partition.
private struct OverageDay: Hashable, Comparable {
    static let microsecondsPerDay: Int64 = 86_400_000_000
    let wallet: WalletKey
    let periodStart: Int64
    let partition: Int32
    /// Days since 1970-01-01 (UTC).
    let day: Int64

    static func < (a: OverageDay, b: OverageDay) -> Bool {
        (a.wallet.customerID, a.wallet.currency.code, a.periodStart, a.day, a.partition)
            < (b.wallet.customerID, b.wallet.currency.code, b.periodStart, b.day, b.partition)
    }
}

/// What one batch adds to an overage entry.
private struct OverageTotal {
    var amountNanos: Int128 = 0
    var entries: Int64 = 0
    var firstOffset = Int64.max
    var lastOffset = Int64.min
    var lastEffectiveAt = Int64.min

    mutating func add(_ entry: LedgerEntry) {
        amountNanos += Int128(entry.amountNanos)
        entries += 1
        firstOffset = min(firstOffset, entry.position.offset)
        lastOffset = max(lastOffset, entry.position.offset)
        lastEffectiveAt = max(lastEffectiveAt, entry.effectiveAt.microseconds)
    }
}
