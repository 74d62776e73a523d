import TallyCLI

AggregatorCommand.main()
