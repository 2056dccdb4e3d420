"""The `debiformer` command line."""
