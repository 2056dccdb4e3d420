"""Tests of the `debiformer` command (`debiformer.cli`), its recipes and how it installs."""
