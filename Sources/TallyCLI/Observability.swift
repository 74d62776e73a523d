import ArgumentParser
import Logging
import Metrics
import Prometheus

/// Where a service serves `/livez`, `/readyz` and `/metrics`.
public struct OpsOptions: ParsableArguments {
    @Option(name: .customLong("ops-address"),
            help: "host:port for /livez, /readyz and /metrics (port 0 picks a free one; 'off' disables). Env: TALLY_AGGREGATOR_OPS_ADDRESS or TALLY_RATER_OPS_ADDRESS (the service's own), else TALLY_OPS_ADDRESS. Default: 0.0.0.0:9464.")
    var opsAddressFlag: String?

    public init() {}

    /// Installs the Prometheus metrics backend. Call it before creating anything that
    /// makes metrics: those made earlier report to nowhere.
    public static func bootstrapMetrics() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return registry
    }

    /// The ops endpoint of `service` (`tally-aggregator`) serving `registry`, as a service; nil
    /// when disabled. The service's own variable (`TALLY_AGGREGATOR_OPS_ADDRESS`) comes before
    /// the shared one, so services on one host (the local stack) each get a port Prometheus knows.
    /// - Throws: `ValidationError` when the address is no host:port.
    func endpoint(service: String, registry: PrometheusCollectorRegistry, logger: Logger, ready: @escaping @Sendable () -> Bool) throws -> OpsEndpoint? {
        let ownVariable = service.uppercased().replacingOccurrences(of: "-", with: "_") + "_OPS_ADDRESS"
        let address = opsAddressFlag ?? environment(ownVariable) ?? environment("TALLY_OPS_ADDRESS") ?? "0.0.0.0:9464"
        if address == "off" { return nil }
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]), (0...65535).contains(port) else {
            throw ValidationError("--ops-address \(address): expected host:port")
        }
        return OpsEndpoint(host: String(address[..<colon]), port: port, logger: logger, ready: ready,
                           metrics: { registry.emitToString() })
    }
}
