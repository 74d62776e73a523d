import ArgumentParser
import Foundation
import TallyCLI
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
