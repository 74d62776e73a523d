import ArgumentParser
import Foundation
import TallyCLI
import TallyCore
import TallyPostgres

struct Keys: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage ingest API keys (stored hashed in tally.api_keys).",
        subcommands: [Create.self, List.self, Revoke.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a key and print it once.")
        @OptionGroup var database: DatabaseOptions
        @Option(help: "What the key is for.") var name: String
        @Option(help: "Limit the key to events of this data.environment.") var environment: String?
        @Flag(help: "Allow the key to grant wallet credit (POST /v1/wallets/{customer}/grants).") var grants = false
        @Option(help: "Make it a customer's key: gateway calls with it are metered for, and checked against the credit of, this customer.") var customer: String?
        @Flag(help: "Allow the key (of no customer) to name whom a gateway call is for in tally-ingest's --customer-header: an application trusted to say so.")
        var namesCustomers = false

        func validate() throws {
            if namesCustomers && customer != nil { throw ValidationError("--names-customers is for keys of no customer: a customer's key pays for its own calls") }
        }

        func run() throws {
            let store = APIKeyStore(connection: try PostgresConnection(url: try database.databaseURL, logger: .init(label: "tally.keys")))
            let (key, record) = try store.create(name: name, environment: environment, mayGrant: grants, customerID: customer,
                                                 mayNameCustomer: namesCustomers)
            print(key)
            print("key id \(record.keyID)\(record.customerID.map { " of customer \($0)" } ?? "")\(record.environment.map { ", limited to environment \($0)" } ?? "")\(grants ? ", may grant credit" : "")\(namesCustomers ? ", may name customers in the gateway" : ""): store it now, it is not shown again", to: &standardError)
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List keys (ids and names, never the keys).")
        @OptionGroup var database: DatabaseOptions

        func run() throws {
            let store = APIKeyStore(connection: try PostgresConnection(url: try database.databaseURL, logger: .init(label: "tally.keys")))
            let rows = try store.list().map { [$0.keyID, $0.name, $0.customerID ?? "", $0.environment ?? "", $0.mayGrant ? "yes" : "no", $0.createdAt, $0.revokedAt ?? ""] }
            print(TableRenderer.render(header: ["key_id", "name", "customer", "environment", "grants", "created_at", "revoked_at"], rows: rows, format: "table", numericFrom: 7),
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
