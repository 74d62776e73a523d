import ArgumentParser
import TallyIngest

/// Called in a context that knows only `AsyncParsableCommand`, `main()` is the async entry point
/// (a plain `IngestCommand.main()` here resolves to the synchronous one, which refuses to run it).
func runAsync<Command: AsyncParsableCommand>(_ command: Command.Type) async { await command.main() }

await runAsync(IngestCommand.self)
