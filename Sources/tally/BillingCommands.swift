import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyKafka
import TallyPipeline
import TallyPostgres

func connect(_ database: DatabaseOptions, label: String) throws -> PostgresConnection {
    try PostgresConnection(url: try database.databaseURL, logger: .init(label: label), searchPath: "tally")
}

func readText(_ path: String) throws -> String {
    if path == "-" { return String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self) }
    guard let data = FileManager.default.contents(atPath: path) else { throw ValidationError("cannot read \(path)") }
    return String(decoding: data, as: UTF8.self)
}

/// Parses a decimal amount option into nano-units, with a clear error.
func amountNanos(_ text: String, option: String, allowZero: Bool = false) throws -> Int64 {
    guard let nanos = Money.nanos(text), allowZero ? nanos >= 0 : nanos > 0 else {
        throw ValidationError("\(option) \(text): expected a decimal amount\(allowZero ? "" : " above 0") with at most 9 decimals, e.g. 25.00")
    }
    return nanos
}

struct Pricing: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage versioned price books (tally.price_books).",
        subcommands: [Apply.self, List.self, Show.self, Diff.self, ImportLiteLLM.self, RateUnpriced.self])

    struct Apply: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a price book (YAML or JSON) and store it as the book's next version.",
            discussion: "Errors name the line and field. Applying an unchanged book again stores nothing. Events are rated with the version in force at their event time; replay to re-rate past usage.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The price book file; - reads standard input.") var file: String
        @Flag(help: "Only validate and print the canonical form.") var dryRun = false

        func run() throws {
            let book: PriceBook
            do { book = try PriceBookDocument.parse(try readText(file)) } catch let error as ConfigError {
                throw ValidationError("\(file): \(error)")
            }
            if dryRun { print(PriceBookDocument.canonicalJSON(book), terminator: ""); return }
            let store = BillingCatalogStore(connection: try connect(database, label: "tally.pricing"))
            // Unpriced usage is kept aside, not billed: say so before it happens.
            for model in try store.modelsLosingPrice(book) {
                print("warning: \(model) has usage in the 35 days before \(book.effectiveFrom) or since, and no price in this version of "
                      + "\(book.name): from \(book.effectiveFrom) its events go to tally.unpriced_usage, not billed", to: &standardError)
            }
            let version: Int, created: Bool
            do { (version, created) = try store.apply(book) } catch let refusal as PriceBookRefusal { throw ValidationError("\(file): \(refusal)") }
            let owner = book.customerID.map { " (override for \($0))" } ?? ""
            let meters = book.meters.isEmpty ? "" : " and \(book.meters.count) meters"
            print(created ? "applied \(book.name)\(owner) version \(version): \(book.models.count) models\(meters), effective from \(book.effectiveFrom)"
                          : "\(book.name)\(owner) version \(version) is identical; nothing stored")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List every version of every price book.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "table, json or csv.") var format = "table"

        func run() throws {
            let rows = try BillingCatalogStore(connection: try connect(database, label: "tally.pricing")).versions().map {
                [$0.name, $0.customerID ?? "", String($0.version), $0.effectiveFrom, $0.currency, $0.appliedAt]
            }
            print(TableRenderer.render(header: ["book", "customer", "version", "effective_from", "currency", "applied_at"], rows: rows,
                                       format: format, numericFrom: 6), terminator: "")
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a stored price book version as canonical JSON.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "Book name (or the customer id of an override).") var book: String
        @Option(help: "Version; the latest when omitted.") var version: Int?

        func run() throws {
            let versions = try BillingCatalogStore(connection: try connect(database, label: "tally.pricing")).versions(name: book)
            guard let chosen = version.map({ wanted in versions.first { $0.version == wanted } }) ?? versions.last else {
                throw ValidationError("no price book \(book)\(version.map { " version \($0)" } ?? "")")
            }
            print(chosen.document, terminator: "")
        }
    }

    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show what changed between two versions of a price book, per model and token type.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "Book name (or the customer id of an override).") var book: String
        @Option(help: "The older version.") var from: Int
        @Option(help: "The newer version; the latest when omitted.") var to: Int?

        func run() throws {
            let all = try BillingCatalogStore(connection: try connect(database, label: "tally.pricing")).versions(name: book)
            // One book: a customer's override when `book` is a customer with one, else the plan (not
            // the overrides of customers whose plan it is, which share its name).
            let overrides = all.filter { $0.customerID == book }
            let versions = overrides.isEmpty ? all.filter { $0.name == book && $0.customerID == nil } : overrides
            guard let old = versions.first(where: { $0.version == from }),
                  let new = to.map({ wanted in versions.first { $0.version == wanted } }) ?? versions.last else {
                throw ValidationError("no such versions of \(book)")
            }
            let a = try PriceBookDocument.parse(old.document), b = try PriceBookDocument.parse(new.document)
            print(PriceBookDiff.lines(from: a, to: b).joined(separator: "\n"))
        }
    }

    struct RateUnpriced: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rate-unpriced",
            abstract: "Rate usage kept in tally.unpriced_usage that a price book now prices, without a replay.",
            discussion: """
                Sends each such event to the usage topic again, keyed by its customer and marked with the header \
                \(rateUnpricedHeader): the rater charges it at the prices in force at its event time and removes it from \
                tally.unpriced_usage; to the aggregator it is a duplicate, counted once. Sending it twice charges once. \
                Events still without a price stay where they are.
                """)
        @OptionGroup var database: DatabaseOptions
        @OptionGroup var kafka: KafkaOptions
        @OptionGroup var logging: LoggingOptions
        @Option(help: "Only this customer.") var customer: String?
        @Option(help: "Only this model.") var model: String?

        func run() async throws {
            let logger = makeLogger(logging, label: "tally.pricing")
            let connection = try connect(database, label: "tally.pricing")
            let store = BillingCatalogStore(connection: connection)
            let catalog = try store.loadCatalog()
            let rows = try connection.query("""
                SELECT customer_id, model, (extract(epoch FROM event_time) * 1000000)::bigint, document FROM unpriced_usage
                WHERE ($1::text IS NULL OR customer_id = $1) AND ($2::text IS NULL OR model = $2)
                ORDER BY partition, record_offset
                """, [customer, model])
            let profiles = try store.profiles(Array(Set((0..<rows.rowCount).map { try rows.value($0, 0, as: String.self) })))
            var records: [ProducerRecord] = []
            var stillUnpriced: [String: Int] = [:]
            var withoutDocument = 0
            for row in 0..<rows.rowCount {
                let customerID = try rows.value(row, 0, as: String.self), model = try rows.value(row, 1, as: String.self)
                let time = EventTime(microseconds: try rows.value(row, 2, as: Int64.self))
                let plan = profiles[customerID]?.plan ?? BillingProfile(customerID: customerID).plan
                guard catalog.match(customerID: customerID, plan: plan, model: model, at: time) != nil else {
                    stillUnpriced[model, default: 0] += 1
                    continue
                }
                guard let document = rows.string(row, 3) else {
                    withoutDocument += 1
                    continue
                }
                records.append(ProducerRecord(topic: kafka.topic, key: Array(customerID.utf8), value: Array(document.utf8),
                                              headers: [KafkaHeader(rateUnpricedHeader, Array("1".utf8))]))
            }
            if !records.isEmpty {
                let producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties),
                                                 logger: logger)
                let results = await producer.send(records)
                await producer.close()
                let failed = results.filter { if case .failure = $0 { return true } else { return false } }.count
                if failed > 0 { throw ValidationError("\(failed) of \(records.count) events could not be sent; run the command again (a second copy charges once)") }
            }
            print("sent \(records.count) unpriced events to be rated")
            for (model, count) in stillUnpriced.sorted(by: { $0.key < $1.key }) {
                print("\(model): \(count) events still have no price at their event time", to: &standardError)
            }
            if withoutDocument > 0 {
                print("\(withoutDocument) events were kept before Tally stored unpriced events whole; a replay rates them", to: &standardError)
            }
        }
    }

    struct ImportLiteLLM: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "import-litellm",
            abstract: "Turn LiteLLM's model_prices_and_context_window.json into a price book (exact per-token prices).")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The LiteLLM JSON file.") var file: String
        @Option(help: "Book name.") var book = "default"
        @Option(help: "Effective from (RFC 3339).") var effectiveFrom: String
        @Option(help: "Currency of the prices.") var currency = "USD"
        @Flag(help: "Store it as the book's next version (otherwise print the canonical book).") var apply = false

        func run() throws {
            guard let time = EventTime(effectiveFrom) else { throw ValidationError("--effective-from: expected RFC 3339, e.g. 2026-01-01T00:00:00Z") }
            guard let code = Currency(currency) else { throw ValidationError("--currency: expected an ISO 4217 code") }
            let imported: PriceBookDocument.LiteLLMImport
            do { imported = try PriceBookDocument.importLiteLLM(try readText(file), name: book, effectiveFrom: time, currency: code) } catch let error as ConfigError {
                throw ValidationError("\(file): \(error)")
            }
            for (model, reason) in imported.skipped { print("skipped \(model): \(reason)", to: &standardError) }
            for (model, reason) in imported.unmapped { print("imported \(model) without some prices: \(reason)", to: &standardError) }
            let tiered = imported.book.models.filter { !$0.contextTiers.isEmpty }.count
            let ruled = imported.book.models.filter { !$0.rules.isEmpty }.count
            print("\(imported.book.models.count) models imported (\(tiered) with context tiers, \(ruled) with batch or service-tier rules), "
                + "\(imported.skipped.count) skipped, "
                + "\(imported.unmapped.count) imported with prices Tally does not bill by token", to: &standardError)
            if apply {
                let (version, _) = try BillingCatalogStore(connection: try connect(database, label: "tally.pricing")).apply(imported.book)
                print("applied \(book) version \(version)")
            } else {
                print(PriceBookDocument.canonicalJSON(imported.book), terminator: "")
            }
        }
    }
}


struct Customers: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage customers' billing settings (tally.customers).", subcommands: [Set.self, Show.self])

    struct Set: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create or update a customer's billing settings; options not given keep their stored (or default) value.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "Customer id (the events' subject).") var customer: String
        @Option(help: "Price book (plan) name. Default: default.") var plan: String?
        @Option(help: "Wallet and invoice currency. Default: USD.") var currency: String?
        @Option(help: "Day of the month (1–28, UTC) billing periods start.") var anchorDay: Int?
        @Option(help: "Subscription fee per period (hybrid subscription + usage), e.g. 49.00.") var subscriptionFee: String?
        @Option(help: "allow (overage down to --overage-limit) or stop (refuse calls at zero balance).") var overage: String?
        @Option(help: "With --overage allow: how far below zero before calls are refused ('none' for no limit).") var overageLimit: String?
        @Option(help: "Low-balance alert thresholds, comma-separated ('none' to clear), e.g. 100,10.") var lowBalance: String?
        @Option(help: "Auto top-up: request a top-up when the balance falls below this ('none' to clear).") var autoTopupBelow: String?
        @Option(help: "Auto top-up: the amount to request.") var autoTopupAmount: String?

        func run() throws {
            let store = BillingCatalogStore(connection: try connect(database, label: "tally.customers"))
            let stored = try store.profiles([customer])[customer] ?? BillingProfile(customerID: customer)
            var change = BillingSettingsChange()
            change.plan = plan
            change.currency = currency
            change.anchorDay = anchorDay.map(Int64.init)
            change.subscriptionFee = subscriptionFee
            change.overagePolicy = overage
            change.overageLimit = overageLimit.map { $0 == "none" ? nil : $0 }
            change.lowBalanceThresholds = lowBalance.map { $0 == "none" ? [] : $0.split(separator: ",").map(String.init) }
            if autoTopupBelow == "none" {
                change.autoTopUp = .some(nil)
            } else if autoTopupBelow != nil || autoTopupAmount != nil {
                // One of the two keeps the stored other.
                guard let below = autoTopupBelow ?? stored.autoTopUp.map({ Money.format(nanos: $0.belowNanos) }),
                      let amount = autoTopupAmount ?? stored.autoTopUp.map({ Money.format(nanos: $0.amountNanos) }) else {
                    throw ValidationError("auto top-up needs both --auto-topup-below and --auto-topup-amount")
                }
                change.autoTopUp = .some(.init(below: below, amount: amount))
            }
            let profile: BillingProfile
            switch change.applied(to: stored) {
            case .success(let changed): profile = changed
            case .failure(let invalid):
                // The JSON form's names, said as this command's options.
                let options = ["billing_anchor_day": "--anchor-day", "overage_policy": "--overage", "low_balance_thresholds": "--low-balance",
                               "auto_topup": "--auto-topup-below/--auto-topup-amount"]
                throw ValidationError(invalid.violations.map { violation in
                    let field = String(violation.path.split(separator: ".").first ?? "")
                    return "\(options[field] ?? "--" + field.replacingOccurrences(of: "_", with: "-")): \(violation.reason)"
                }.joined(separator: "; "))
            }
            try store.setProfile(profile)
            print(describe(profile))
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a customer's billing settings.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "Customer id.") var customer: String

        func run() throws {
            let stored = try BillingCatalogStore(connection: try connect(database, label: "tally.customers")).profiles([customer])[customer]
            print(describe(stored ?? BillingProfile(customerID: customer)) + (stored == nil ? "\n(no stored settings: defaults)" : ""))
        }
    }

    static func describe(_ profile: BillingProfile) -> String {
        let overage = switch profile.overage {
        case .stop: "stop (calls refused at zero balance)"
        case .allow(let limit?): "allow down to -\(Money.format(nanos: limit))"
        case .allow(nil): "allow, no limit"
        }
        return """
            customer        \(profile.customerID)
            plan            \(profile.plan)
            currency        \(profile.currency)
            billing period  monthly from day \(profile.anchorDay) (UTC)
            subscription    \(Money.format(nanos: profile.subscriptionFeeNanos))
            overage         \(overage)
            low balance     \(profile.lowBalanceThresholdsNanos.isEmpty ? "no alerts" : profile.lowBalanceThresholdsNanos.map { Money.format(nanos: $0) }.joined(separator: ", "))
            auto top-up     \(profile.autoTopUp.map { "request \(Money.format(nanos: $0.amountNanos)) below \(Money.format(nanos: $0.belowNanos))" } ?? "off")
            """
    }
}

struct Grant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Grant prepaid credit: publish a signed tally.wallet.grant event to the usage topic.",
        discussion: """
            The grant id is its idempotency key: publishing the same grant again credits once. The record is signed with the \
            credit keyring's sign key (--credit-keys-file), without which the rater would not apply it. Prints the grant id.
            """)
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @OptionGroup var creditKeys: CreditKeyOptions
    @Option(help: "Customer id.") var customer: String
    @Option(help: "Amount, e.g. 100.00.") var amount: String
    @Option(help: "ISO 4217 currency.") var currency = "USD"
    @Option(help: "Grants with the lowest number are drawn first.") var priority = GrantEvent.defaultPriority
    @Option(help: "Expiry (RFC 3339); the remainder is written off then.") var expiresAt: String?
    @Option(help: "purchase, promotion or top_up.") var source = "purchase"
    @Option(help: "Grant id (idempotency key). Default: a new random id.") var id: String?
    @Option(help: "Event time (RFC 3339). Default: now.") var time: String?

    func run() async throws {
        let logger = makeLogger(logging, label: "tally.grant")
        guard let code = Currency(currency) else { throw ValidationError("--currency \(currency): expected an ISO 4217 code") }
        guard let grantSource = GrantSource(rawValue: source) else { throw ValidationError("--source: purchase, promotion or top_up") }
        let eventTime = try time.map { guard let t = EventTime($0) else { throw ValidationError("--time: expected RFC 3339") }; return t }
            ?? EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000))
        let expiry = try expiresAt.map { guard let t = EventTime($0) else { throw ValidationError("--expires-at: expected RFC 3339") }; return t }
        let grant = GrantEvent(id: id ?? "grant-\(UUID().uuidString.lowercased())", source: "tally-cli", subject: customer, time: eventTime,
                               amountNanos: try amountNanos(amount, option: "--amount"), currency: code, priority: priority,
                               expiresAt: expiry, grantSource: grantSource)
        // Validate exactly as the consumers will.
        let bytes = EventEncoder.encode(grant)
        if case .failure(let error) = EventDecoder.decode(bytes) { throw ValidationError("invalid grant: \(error)") }
        let keyring = try creditKeys.signingKeyring(logger: logger)
        let producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties), logger: logger)
        let report = try await producer.send(ProducerRecord.signedCredit(topic: kafka.topic, customerID: customer, value: bytes, keyring: keyring)!)
        await producer.close()
        print(grant.id)
        print("granted \(Money.format(nanos: grant.amountNanos)) \(code) to \(customer) (partition \(report.partition), offset \(report.offset))", to: &standardError)
    }
}

struct VoidGrant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "void-grant",
        abstract: "Void a grant: publish a signed tally.wallet.grant.void event; the rater writes off what is left of it.",
        discussion: """
            Credit already drawn stays drawn (it paid for usage). The void's id is void-<grant id>, so voiding twice \
            voids once. A grant with nothing left is not changed; the void is kept in tally.unrateable_records with why.
            """)
    @OptionGroup var kafka: KafkaOptions
    @OptionGroup var logging: LoggingOptions
    @OptionGroup var creditKeys: CreditKeyOptions
    @Option(help: "Customer id.") var customer: String
    @Option(help: "The grant id to void.") var grant: String
    @Option(help: "Why, for people.") var reason: String?
    @Option(help: "The void's id (idempotency key). Default: void-<grant id>; a void that found nothing to void needs another to try again.")
    var id: String?
    @Option(help: "Event time (RFC 3339). Default: now.") var time: String?

    func run() async throws {
        let logger = makeLogger(logging, label: "tally.void-grant")
        let eventTime = try time.map { guard let t = EventTime($0) else { throw ValidationError("--time: expected RFC 3339") }; return t }
            ?? EventTime(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000))
        let void = GrantVoidEvent(id: id ?? GrantVoidEvent.id(voiding: grant), source: "tally-cli", subject: customer, time: eventTime,
                                  grantID: grant, reason: reason)
        // Validate exactly as the consumers will.
        let bytes = EventEncoder.encode(void)
        if case .failure(let error) = EventDecoder.decode(bytes) { throw ValidationError("invalid void: \(error)") }
        let keyring = try creditKeys.signingKeyring(logger: logger)
        let producer = try KafkaProducer(configuration: KafkaConfiguration(brokers: try kafka.brokers, properties: try kafka.extraProperties), logger: logger)
        let report = try await producer.send(ProducerRecord.signedCredit(topic: kafka.topic, customerID: customer, value: bytes, keyring: keyring)!)
        await producer.close()
        print(void.id)
        print("voided grant \(grant) of \(customer) (partition \(report.partition), offset \(report.offset)); see tally balance once the rater has read it",
              to: &standardError)
    }
}

struct Balance: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a customer's wallet: balance, grants with what is left and their expiry, recent ledger and overage entries.")
    @OptionGroup var database: DatabaseOptions
    @Option(help: "Customer id.") var customer: String
    @Option(help: "Ledger entries to show.") var entries = 10

    func run() throws {
        let connection = try connect(database, label: "tally.balance")
        let balances = try connection.query("""
            SELECT b.currency, b.balance_nanos, b.blocked, (SELECT sum(amount_nanos) FROM wallet_ledger l WHERE l.customer_id = b.customer_id AND l.currency = b.currency),
                   (SELECT sum(amount_nanos) FROM wallet_overage o WHERE o.customer_id = b.customer_id AND o.currency = b.currency)
            FROM wallets b WHERE b.customer_id = $1 ORDER BY b.currency
            """, [customer])
        guard balances.rowCount > 0 else { print("\(customer): no wallet yet (no grant or priced usage rated)"); return }
        for row in 0..<balances.rowCount {
            let currency = try balances.value(row, 0, parsedBy: Currency.init)
            let balance = try balances.value(row, 1, as: Int64.self)
            print("\(customer) \(currency): balance \(Money.format(nanos: balance))\(try balances.value(row, 2, as: Bool.self) ? "  (calls refused: credit exhausted)" : "")")
            let entries = (try balances.int128(row, 3) ?? 0) + (try balances.int128(row, 4) ?? 0)
            if entries != Int128(balance) { print("  warning: the sum of ledger and overage entries \(Money.format(nanos: entries)) differs from the running balance") }
        }
        let grants = try connection.query("""
            SELECT grant_id, source, priority, currency, amount_nanos, remaining_nanos,
                   coalesce(to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), 'never')
            FROM wallet_grants WHERE customer_id = $1 ORDER BY remaining_nanos = 0, priority, expires_at NULLS LAST, grant_id
            """, [customer])
        print("\ngrants:")
        print(TableRenderer.render(header: ["grant", "source", "priority", "currency", "amount", "remaining", "expires_at"],
                                   rows: try (0..<grants.rowCount).map { row in
                                       [try grants.value(row, 0, as: String.self), try grants.value(row, 1, as: String.self), try grants.value(row, 2, as: String.self), try grants.value(row, 3, as: String.self),
                                        Money.format(nanos: try grants.value(row, 4, as: Int64.self)), Money.format(nanos: try grants.value(row, 5, as: Int64.self)), try grants.value(row, 6, as: String.self)]
                                   }, format: "table", numericFrom: 7), terminator: "")
        let ledger = try connection.query("""
            SELECT to_char(effective_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), kind, currency, amount_nanos, coalesce(grant_id, ''), event_id
            FROM wallet_ledger WHERE customer_id = $1 ORDER BY partition DESC, record_offset DESC, seq DESC LIMIT $2
            """, [customer, entries])
        print("\nrecent ledger entries:")
        print(TableRenderer.render(header: ["effective_at", "kind", "currency", "amount", "grant", "event"],
                                   rows: try (0..<ledger.rowCount).map { row in
                                       [try ledger.value(row, 0, as: String.self), try ledger.value(row, 1, as: String.self), try ledger.value(row, 2, as: String.self),
                                        Money.format(nanos: try ledger.value(row, 3, as: Int64.self)), try ledger.value(row, 4, as: String.self), try ledger.value(row, 5, as: String.self)]
                                   }, format: "table", numericFrom: 6), terminator: "")
        let overage = try connection.query("""
            SELECT day::text, currency, amount_nanos, entries, partition, first_offset, last_offset
            FROM wallet_overage WHERE customer_id = $1 ORDER BY day DESC, currency, partition LIMIT $2
            """, [customer, entries])
        print("\nrecent overage entries (usage beyond every grant, one per day):")
        print(TableRenderer.render(header: ["day", "currency", "amount", "events", "partition", "offsets"],
                                   rows: try (0..<overage.rowCount).map { row in
                                       [try overage.value(row, 0, as: String.self), try overage.value(row, 1, as: String.self),
                                        Money.format(nanos: try overage.value(row, 2, as: Int128.self)), try overage.value(row, 3, as: String.self),
                                        try overage.value(row, 4, as: String.self), "\(try overage.value(row, 5, as: String.self))..\(try overage.value(row, 6, as: String.self))"]
                                   }, format: "table", numericFrom: 6), terminator: "")
    }
}

struct Invoices: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Close billing periods into invoices and show them.", subcommands: [Close.self, List.self, Show.self])

    struct Close: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Close a billing period: one invoice per customer (usage lines, adjustments for late usage, subscription, minimum, credits).",
            discussion: "Usage that arrives later for a closed period appears as an adjustment line on the customer's next invoice.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "The period, YYYY-MM (starting on each customer's anchor day).") var period: String?
        @Option(help: "Only this customer.") var customer: String?
        @Option(help: "Instead of --period: close every period that ended this many hours (of event time) before the latest event rated.")
        var dueAfterGraceHours: Int?
        @Flag(help: "Close a --period that has not ended yet (usage after the close is billed as an adjustment next period).")
        var force = false

        func validate() throws {
            guard (period == nil) != (dueAfterGraceHours == nil) else { throw ValidationError("give --period or --due-after-grace-hours") }
            if let period, BillingPeriod.parse(period, anchorDay: 1) == nil { throw ValidationError("--period \(period): expected YYYY-MM") }
        }

        func run() throws {
            let store = InvoiceStore(connection: try connect(database, label: "tally.invoices"))
            let now = Int64(Date().timeIntervalSince1970 * 1_000_000)
            let closing = try period.map { try store.close(periodLabel: $0, customerID: customer, now: now, force: force) }
                ?? store.closeDue(grace: .seconds(Int64(dueAfterGraceHours!) * 3600))
            for invoice in closing.closed {
                print("\(invoice.invoiceID): \(invoice.lines.count) lines, total due \(invoice.currency.format(invoice.totalDueNanos)) \(invoice.currency)")
            }
            for invoiceID in closing.alreadyClosed { print("\(invoiceID): already closed, left as it is") }
            for reason in closing.refused { print("not closed: \(reason)", to: &standardError) }
            print("closed \(closing.closed.count) invoices")
            if !closing.refused.isEmpty { throw ExitCode(1) }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List invoices.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "Only this customer.") var customer: String?
        @Option(help: "table, json or csv.") var format = "table"

        func run() throws {
            let rows = try InvoiceStore(connection: try connect(database, label: "tally.invoices")).list(customerID: customer)
                .map { [$0.invoiceID, $0.customerID, $0.period, $0.currency, $0.totalDue, $0.closedAt] }
            print(TableRenderer.render(header: ["invoice", "customer", "period", "currency", "total_due", "closed_at"], rows: rows,
                                       format: format, numericFrom: 4), terminator: "")
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Render an invoice as JSON or as an HTML document.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "Customer id.") var customer: String
        @Option(help: "The period, YYYY-MM.") var period: String
        @Option(help: "json or html.") var format = "json"

        func run() throws {
            guard let invoice = try InvoiceStore(connection: try connect(database, label: "tally.invoices")).invoice(customerID: customer, periodLabel: period) else {
                throw ValidationError("no invoice for \(customer) in \(period) (close the period first: tally invoices close --period \(period))")
            }
            print(format == "html" ? InvoiceBuilder.html(invoice) : InvoiceBuilder.json(invoice), terminator: "")
        }
    }
}
