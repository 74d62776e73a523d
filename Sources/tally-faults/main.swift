import ArgumentParser
import Foundation
import Hummingbird
import TallyCLI
import TallyIngest
import TallyTesting

// Test-only: the production commands with TallyTesting's fault decorators, chosen by the
// environment (see `ConsumerFaults` and `ForcedServerErrors`). The fault suite runs
// `tally-faults tally-aggregator …` where it needs a deliberate break or a fault knob; nothing ships it.
let arguments = Array(CommandLine.arguments.dropFirst())
let faults = ConsumerFaults.fromEnvironment()
let decorate: StoreDecorator = { store, settings, connect in try faults.decorate(store, settings: settings, connect: connect) }

/// Parses and runs `command` with its store decorated, exiting as ArgumentParser does on an error.
func runDecorated<Command: DecoratableConsumerCommand>(_ command: Command.Type, _ arguments: [String], decorate: @escaping StoreDecorator) async {
    do {
        try await Command.parse(arguments).run(decorate: decorate)
    } catch {
        Command.exit(withError: error)
    }
}

switch arguments.first {
case "tally-aggregator": await runDecorated(AggregatorCommand.self, Array(arguments.dropFirst()), decorate: decorate)
case "tally-rater": await runDecorated(RaterCommand.self, Array(arguments.dropFirst()), decorate: decorate)
case "tally-ingest":
    let forceServerErrors = ForcedServerErrors<BasicRequestContext>.requested()
    do {
        try await IngestCommand.parse(Array(arguments.dropFirst())).run { router in if forceServerErrors { router.add(middleware: ForcedServerErrors()) } }
    } catch {
        IngestCommand.exit(withError: error)
    }
default:
    print("usage: tally-faults tally-aggregator|tally-rater|tally-ingest [options]")
    Foundation.exit(2)
}
