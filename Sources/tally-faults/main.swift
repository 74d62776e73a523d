import ArgumentParser
import Foundation
import TallyCLI
import TallyTesting

// Test-only: the production consumer commands with TallyTesting's fault decorators, chosen by
// the environment (see `ConsumerFaults`). The fault suite runs `tally-faults tally-aggregator …`
// where it needs a deliberate break or a fault knob; nothing ships it.
let arguments = Array(CommandLine.arguments.dropFirst())
let faults = ConsumerFaults.fromEnvironment()
let decorate: StoreDecorator = { store, settings, connect in try faults.decorate(store, settings: settings, connect: connect) }
switch arguments.first {
case "tally-aggregator":
    do {
        let command = try AggregatorCommand.parse(Array(arguments.dropFirst()))
        try command.run(decorate: decorate)
    } catch {
        AggregatorCommand.exit(withError: error)
    }
case "tally-rater":
    do {
        let command = try RaterCommand.parse(Array(arguments.dropFirst()))
        try command.run(decorate: decorate)
    } catch {
        RaterCommand.exit(withError: error)
    }
default:
    print("usage: tally-faults tally-aggregator|tally-rater [options]")
    Foundation.exit(2)
}
