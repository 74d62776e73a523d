import TallyCLI

RaterCommand.main()
