// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Tally",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tally", targets: ["tally"]),
        .executable(name: "tally-ingest", targets: ["tally-ingest"]),
        .executable(name: "tally-aggregator", targets: ["tally-aggregator"]),
        .executable(name: "tally-rater", targets: ["tally-rater"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // C libraries: nothing but the module maps; each has exactly one Swift owner.
        .systemLibrary(
            name: "CRdKafka", pkgConfig: "rdkafka",
            providers: [.apt(["librdkafka-dev"]), .brew(["librdkafka"])]),
        .systemLibrary(
            name: "CLibpq", pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"]), .brew(["libpq"])]),

        // Pure logic: events, validation, windows. No I/O, no C imports.
        .target(name: "TallyCore", dependencies: [.product(name: "Crypto", package: "swift-crypto"), .product(name: "Yams", package: "Yams")]),
        // The only target that calls rd_kafka_*.
        .target(
            name: "TallyKafka",
            dependencies: ["CRdKafka", .product(name: "Logging", package: "swift-log")]),
        // The only target that calls PQ*; owns the migrations.
        .target(
            name: "TallyPostgres",
            dependencies: ["CLibpq", .product(name: "Logging", package: "swift-log")],
            resources: [.copy("Migrations")]),
        // The consumer loops and their PostgreSQL stores.
        .target(
            name: "TallyPipeline",
            dependencies: [
                "TallyCore", "TallyKafka", "TallyPostgres",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]),
        // Shared command-line settings (flags + environment) for the executables.
        .target(
            name: "TallyCLI",
            dependencies: [
                "TallyCore", "TallyKafka", "TallyPostgres", "TallyPipeline",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]),

        .executableTarget(
            name: "tally",
            dependencies: [
                "TallyCore", "TallyKafka", "TallyPostgres", "TallyPipeline", "TallyCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // The ingest API and LLM gateway (tally-ingest), a library so tests can decorate its router.
        .target(
            name: "TallyIngest",
            dependencies: [
                "TallyCore", "TallyKafka", "TallyPostgres", "TallyPipeline", "TallyCLI",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
            ],
            // The OpenAPI document served at /openapi.json (docs/api.md).
            resources: [.copy("openapi.yaml")]),
        .executableTarget(name: "tally-ingest", dependencies: ["TallyCLI", "TallyIngest"]),
        .executableTarget(
            name: "tally-aggregator",
            dependencies: [
                "TallyCore", "TallyKafka", "TallyPostgres", "TallyPipeline", "TallyCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .executableTarget(
            name: "tally-rater",
            dependencies: [
                "TallyCore", "TallyKafka", "TallyPostgres", "TallyPipeline", "TallyCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        // Micro-benchmarks run by scripts/bench (release build only).
        .executableTarget(
            name: "tally-bench",
            dependencies: ["TallyCore", "TallyKafka", "TallyPipeline", .product(name: "Logging", package: "swift-log")]),

        // In-memory twins of the pipeline's I/O (record source, dead-letter sink, stores) and
        // fault decorators, for in-process tests; no executable links it.
        .target(
            name: "TallyTesting",
            dependencies: ["TallyCore", "TallyKafka", "TallyPostgres", "TallyPipeline", .product(name: "Hummingbird", package: "hummingbird")]),
        // Test-only: the consumers and tally-ingest with TallyTesting's fault decorators, for the fault suite.
        .executableTarget(
            name: "tally-faults",
            dependencies: ["TallyCLI", "TallyIngest", "TallyTesting", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Hummingbird", package: "hummingbird")]),

        .testTarget(name: "TallyCoreTests", dependencies: ["TallyCore"], resources: [.copy("Fixtures")]),
        // The consumer loop in-process: fencing, resync, rebalances, lanes, poison records, determinism.
        .testTarget(
            name: "TallyPipelineTests",
            dependencies: ["TallyCore", "TallyKafka", "TallyPipeline", "TallyTesting", .product(name: "Logging", package: "swift-log")]),
        .testTarget(
            name: "TallyIntegrationTests",
            dependencies: ["TallyCore", "TallyKafka", "TallyPostgres"],
            // Producers in other languages the tests run (Python's confluent-kafka).
            exclude: ["Producers"]),
    ]
)
