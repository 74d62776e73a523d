import TallyCLI

await runAsync(AggregatorCommand.self)
