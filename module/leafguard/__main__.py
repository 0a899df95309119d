from leafguard.cli import entry

entry()
