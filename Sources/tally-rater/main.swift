import TallyCLI

await runAsync(RaterCommand.self)
