import ArgumentParser
import Foundation
import Logging
import TallyCore
import TallyPostgres

/// Reads a setting from the environment; flags win over it.
public func environment(_ name: String) -> String? {
    guard let value = ProcessInfo.processInfo.environment[name], !value.isEmpty else { return nil }
    return value
}

/// Where Tally's PostgreSQL database is.
public struct DatabaseOptions: ParsableArguments {
    @Option(name: .customLong("database-url"),
            help: "PostgreSQL connection: a postgresql:// URI or a key=value conninfo string. Env: TALLY_DATABASE_URL.")
    var databaseURLFlag: String?

    public init() {}

    public var databaseURL: String {
        get throws {
            guard let url = databaseURLFlag ?? environment("TALLY_DATABASE_URL") else {
                throw ValidationError("no database: pass --database-url or set TALLY_DATABASE_URL (scripts/stack env prints it for the local stack)")
            }
            return url
        }
    }

    /// A connection to Tally's schema, as the consumers open theirs: it waits up to a minute
    /// for a server that is still starting.
    public func connect(logger: Logger) throws -> PostgresConnection {
        try PostgresConnection(url: try databaseURL, logger: logger, connectTimeout: .seconds(60), searchPath: "tally")
    }
}

/// Where the Kafka cluster and Tally's topic are.
public struct KafkaOptions: ParsableArguments {
    @Option(name: .customLong("brokers"),
            help: "Kafka bootstrap servers, comma-separated host:port. Env: TALLY_KAFKA_BROKERS.")
    var brokersFlag: String?

    @Option(name: .customLong("topic"), help: "The usage topic. Env: TALLY_TOPIC. Default: tally.usage.")
    var topicFlag: String?

    @Option(name: .customLong("kafka-property"), parsing: .singleValue,
            help: ArgumentHelp("Extra librdkafka property, repeatable (e.g. security.protocol=SSL).", valueName: "key=value"))
    var kafkaProperties: [String] = []

    @Option(name: .customLong("partitioner"),
            help: "How record keys pick partitions, for Tally's producers and its consumers' check: murmur2 (Kafka's Java default) or crc32 (a log written by librdkafka's old default). Env: TALLY_PARTITIONER. Default: murmur2.")
    var partitionerFlag: String?

    @Option(name: .customLong("dedup-horizon-days"),
            help: "How many days late (event time before the partition's log time) an event may reach the topic and still count; later ones are dead-lettered as past_dedup_horizon. Recorded with the topic on first use; every process must agree. Env: TALLY_DEDUP_HORIZON_DAYS. Default: 35.")
    var dedupHorizonFlag: String?

    public init() {}

    /// The topic's dedup horizon (see `DedupHorizon`), checked against the recorded one.
    public var dedupHorizon: DedupHorizon {
        get throws {
            guard let text = dedupHorizonFlag ?? environment("TALLY_DEDUP_HORIZON_DAYS") else { return DedupHorizon(days: DedupHorizon.defaultDays) }
            guard let days = Int(text), (1...DedupHorizon.maxDays).contains(days) else {
                throw ValidationError("--dedup-horizon-days \(text): expected whole days from 1 to \(DedupHorizon.maxDays)")
            }
            return DedupHorizon(days: days)
        }
    }

    /// The key partitioner producers use and consumers check (see `KeyPartitioner`). An explicit
    /// `--kafka-property partitioner=…` must name one the consumers can check.
    public var partitioner: KeyPartitioner {
        get throws {
            if let name = partitionerFlag ?? environment("TALLY_PARTITIONER") {
                guard let partitioner = KeyPartitioner(rawValue: name) else {
                    throw ValidationError("--partitioner \(name): expected murmur2 or crc32")
                }
                return partitioner
            }
            if let name = try userProperties["partitioner"] {
                guard let partitioner = KeyPartitioner(librdkafkaName: name) else {
                    throw ValidationError("--kafka-property partitioner=\(name): Tally's consumers check where each key belongs, so the partitioner must be murmur2(_random) or consistent(_random); use --partitioner")
                }
                return partitioner
            }
            return .murmur2
        }
    }

    public var brokers: String {
        get throws {
            guard let brokers = brokersFlag ?? environment("TALLY_KAFKA_BROKERS") else {
                throw ValidationError("no Kafka brokers: pass --brokers or set TALLY_KAFKA_BROKERS")
            }
            return brokers
        }
    }

    public var topic: String { topicFlag ?? environment("TALLY_TOPIC") ?? "tally.usage" }

    /// The dead-letter topic that goes with `topic`.
    public var deadLetterTopic: String { topic + ".dlq" }

    /// The librdkafka properties from `--kafka-property`, with `partitioner` set from `partitioner`
    /// (consumers drop it: it is a producer property).
    public var extraProperties: [String: String] {
        get throws {
            var properties = try userProperties
            properties["partitioner"] = try partitioner.librdkafkaName
            return properties
        }
    }

    private var userProperties: [String: String] {
        get throws {
            var properties: [String: String] = [:]
            for entry in kafkaProperties {
                guard let equals = entry.firstIndex(of: "="), equals != entry.startIndex else {
                    throw ValidationError("--kafka-property \(entry): expected key=value")
                }
                properties[String(entry[..<equals])] = String(entry[entry.index(after: equals)...])
            }
            return properties
        }
    }
}

/// Logging settings shared by every executable.
public struct LoggingOptions: ParsableArguments {
    @Option(name: .customLong("log-level"),
            help: "trace, debug, info, notice, warning, error or critical. Env: TALLY_LOG_LEVEL. Default: info.")
    var logLevelFlag: String?

    public init() {}

    public var logLevel: String { logLevelFlag ?? environment("TALLY_LOG_LEVEL") ?? "info" }
}

/// The credit signing keyring (see `CreditKeyring`): signers (tally-ingest, `tally grant`) sign
/// grants and voids with its `sign` key; the rater and replays verify with every key it lists.
public struct CreditKeyOptions: ParsableArguments {
    @Option(name: .customLong("credit-keys-file"),
            help: "The credit signing keyring: lines of `<key id> <hex secret> sign|verify` (make one with `tally credit-keys new`). Env: TALLY_CREDIT_KEYS_FILE.")
    var creditKeysFileFlag: String?

    public init() {}

    public var path: String? { creditKeysFileFlag ?? environment("TALLY_CREDIT_KEYS_FILE") }

    /// The keyring, or nil when none is configured. Errors name the file and line.
    public func keyring(logger: Logger) throws -> CreditKeyring? {
        guard let path else { return nil }
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ValidationError("credit keys file \(path): cannot be read (\(error.localizedDescription))")
        }
        // Of the file itself, not of a symbolic link to it (Kubernetes mounts secrets through links).
        let resolved = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        if let mode = (try? FileManager.default.attributesOfItem(atPath: resolved))?[.posixPermissions] as? Int, mode & 0o077 != 0 {
            // Compose and Kubernetes secrets are often mounted 0444: said, not refused.
            logger.warning("credit keys file \(path) is readable by other users (mode \(String(mode, radix: 8))); whoever reads it can sign credit: chmod 600")
        }
        switch CreditKeyring.parse(text) {
        case .success(let keyring): return keyring
        case .failure(let error): throw ValidationError("credit keys file \(path): \(error)")
        }
    }

    /// The keyring of a process that signs credit: it must hold a `sign` key.
    public func signingKeyring(logger: Logger) throws -> CreditKeyring {
        guard let keyring = try keyring(logger: logger) else {
            throw ValidationError("signing credit needs the credit keys file: pass --credit-keys-file or set TALLY_CREDIT_KEYS_FILE (scripts/stack env prints it for the local stack; `tally credit-keys new` makes one)")
        }
        guard keyring.signingKey != nil else { throw ValidationError("credit keys file \(path ?? ""): no key is marked `sign`") }
        return keyring
    }

    /// The keyring of a process that applies credit (the rater, a replay): refusing to start
    /// without one is what keeps write access to the topic from minting credit.
    public func verifyingKeyring(logger: Logger) throws -> CreditKeyring {
        guard let keyring = try keyring(logger: logger) else {
            throw ValidationError("applying credit needs the credit keys file, to tell grants tally-ingest signed from forged ones: pass --credit-keys-file or set TALLY_CREDIT_KEYS_FILE (`tally credit-keys new` makes one; docs/security.md)")
        }
        return keyring
    }
}
