import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyPostgres

struct Keys: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage API keys and portal tokens (stored hashed in tally.api_keys).",
        subcommands: [Create.self, List.self, Revoke.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a key and print it once.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "What the key is for.") var name: String
        @Option(help: "Limit the key to events of this data.environment.") var environment: String?
        @Option(help: "Comma-separated scopes: ingest (send usage), grants (credit and budgets), read (the read API), admin (all, every customer). A read key with --customer is a customer portal token.")
        var scope = "ingest"
        @Flag(help: "Also allow the key to grant wallet credit and set budgets (the grants scope).") var grants = false
        @Option(help: "The key lapses after this many hours (portal tokens).") var expiresInHours: Int?
        @Option(help: "Make it a customer's key: gateway calls with it are metered for, and checked against the credit of, this customer.") var customer: String?
        @Flag(help: "Allow the key (of no customer) to name whom a gateway call is for in tally-ingest's --customer-header: an application trusted to say so.")
        var namesCustomers = false

        func validate() throws {
            if namesCustomers && customer != nil { throw ValidationError("--names-customers is for keys of no customer: a customer's key pays for its own calls") }
            _ = try scopes()
            if let expiresInHours, !(1...24 * 366).contains(expiresInHours) { throw ValidationError("--expires-in-hours: 1 to \(24 * 366)") }
        }

        func scopes() throws -> Set<APIScope> {
            var scopes: Set<APIScope> = grants ? [.grants] : []
            for name in scope.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !name.isEmpty {
                guard let parsed = APIScope(rawValue: name) else {
                    throw ValidationError("--scope \(name): expected some of \(APIScope.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                scopes.insert(parsed)
            }
            if scopes.isEmpty { throw ValidationError("--scope: name at least one scope") }
            if scopes.contains(.admin) && customer != nil { throw ValidationError("--scope admin is for keys of no customer: an admin key acts for every customer") }
            // --environment limits what a key sends, not what it reads.
            if environment != nil && !scopes.isSubset(of: [.ingest, .grants]) {
                throw ValidationError("--environment limits the events a key sends; a key that reads sees every environment: make it without --environment")
            }
            return scopes
        }

        func run() throws {
            let store = APIKeyStore(connection: try PostgresConnection(url: try database.databaseURL, logger: .init(label: "tally.keys")))
            let expiresAt = expiresInHours.map { Int64(Date().timeIntervalSince1970) * 1_000_000 + Int64($0) * 3_600_000_000 }
            let (key, record) = try store.create(name: name, environment: environment, scopes: try scopes(), customerID: customer,
                                                 mayNameCustomer: namesCustomers, expiresAt: expiresAt)
            print(key)
            print("key id \(record.keyID)\(record.customerID.map { " of customer \($0)" } ?? "")\(record.environment.map { ", limited to environment \($0)" } ?? ""), scopes \(record.scopes.sorted().map(\.rawValue).joined(separator: ","))\(record.expiresAt.map { ", lapses at \($0)" } ?? "")\(namesCustomers ? ", may name customers in the gateway" : ""): store it now, it is not shown again", to: &standardError)
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List keys (ids and names, never the keys).")
        @OptionGroup var database: DatabaseOptions

        func run() throws {
            let store = APIKeyStore(connection: try PostgresConnection(url: try database.databaseURL, logger: .init(label: "tally.keys")))
            let rows = try store.list().map {
                [$0.keyID, $0.name, $0.customerID ?? "", $0.environment ?? "", $0.scopes.sorted().map(\.rawValue).joined(separator: ","), $0.createdAt,
                 $0.expiresAt ?? "", $0.revokedAt ?? ""]
            }
            print(TableRenderer.render(header: ["key_id", "name", "customer", "environment", "scopes", "created_at", "expires_at", "revoked_at"], rows: rows,
                                       format: "table", numericFrom: 8),
                  terminator: "")
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a key by its id; requests with it get 401 from then on.")
        @OptionGroup var database: DatabaseOptions
        @Argument(help: "The key id (see tally keys list).") var keyID: String

        func run() throws {
            let store = APIKeyStore(connection: try PostgresConnection(url: try database.databaseURL, logger: .init(label: "tally.keys")))
            guard try store.revoke(keyID: keyID) else { throw ValidationError("no live key with id \(keyID)") }
            print("revoked \(keyID)")
        }
    }
}

/// Standard error as a `TextOutputStream`, for messages beside printed results.
nonisolated(unsafe) var standardError = StandardError()

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) {
        FileHandle.standardError.write(Data(string.utf8))
    }
}

struct CreditKeys: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "credit-keys",
        abstract: "Make and check the credit signing keyring (grants and voids are applied only when signed with one of its keys).",
        discussion: """
            The keyring is a file of lines `<key id> <hex secret> sign|verify`, readable only by tally-ingest, the rater and \
            whoever runs tally grant. Rotate: append `tally credit-keys new` as the sign key, turn the old key to verify, restart \
            the rater before tally-ingest; keep a verify key while records it signed stay in the log. See docs/security.md.
            """,
        subcommands: [New.self, Check.self])

    struct New: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a keyring line with a new random 256-bit secret.")
        @Option(help: "The key id (1–64 of A–Z a–z 0–9 . _ -). Default: k<today>-<random>.") var id: String?
        @Flag(help: "Mark the key verify (not sign).") var verify = false

        func validate() throws {
            if let id, !CreditKeyring.isValidKeyID(id) { throw ValidationError("--id: 1–64 of A–Z a–z 0–9 . _ -") }
        }

        func run() {
            let today = EventTime.format(microseconds: Int64(Date().timeIntervalSince1970 * 1_000_000)).prefix(10).replacingOccurrences(of: "-", with: "")
            let defaultID = "k\(today)-\(String(UInt16.random(in: 0...UInt16.max), radix: 16))"
            print(CreditKeyring.newKeyLine(id: id ?? defaultID, use: verify ? "verify" : "sign"))
        }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Read the keyring as tally-ingest and the rater will, and list its key ids.")
        @OptionGroup var creditKeys: CreditKeyOptions
        @OptionGroup var logging: LoggingOptions

        func run() throws {
            guard let keyring = try creditKeys.keyring(logger: makeLogger(logging, label: "tally.credit-keys")) else {
                throw ValidationError("no credit keys file: pass --credit-keys-file or set TALLY_CREDIT_KEYS_FILE")
            }
            for key in keyring.keys { print("\(key.id)\t\(key.signs ? "sign" : "verify")") }
            if keyring.signingKey == nil { print("no key signs: tally-ingest and tally grant cannot publish credit with this file", to: &standardError) }
        }
    }
}
