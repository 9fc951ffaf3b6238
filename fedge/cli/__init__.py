"""The `fedge` command line: one command per module, heavy imports inside the command bodies."""
