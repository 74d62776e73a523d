import TallyCLI
import TallyIngest

await runAsync(IngestCommand.self)
