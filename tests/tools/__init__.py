"""Tests of `debiformer.tools`: `bench`, `profile` and the loader benchmark."""
