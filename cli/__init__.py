"""The `debiformer` command line, installed as the package `debiformer.cli`."""
