import Foundation
import Hummingbird

/// The fault suite's deliberate break of tally-ingest (`TALLY_DEBUG_BREAK=server-errors`, run by
/// the test-only `tally-faults tally-ingest`): every 400 answer becomes a 500, so the suite can
/// show that its check of server errors catches it. Production code has no such switch.
public struct ForcedServerErrors<Context: RequestContext>: RouterMiddleware {
    public init() {}

    public func handle(_ request: Request, context: Context,
                       next: (Request, Context) async throws -> Response) async throws -> Response {
        var response = try await next(request, context)
        if response.status == .badRequest { response.status = .internalServerError }
        return response
    }

    /// Whether the environment asks for the break.
    public static func requested(_ environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool {
        (environment["TALLY_DEBUG_BREAK"] ?? "").split(separator: ",").contains("server-errors")
    }
}
