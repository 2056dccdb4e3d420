"""The shipped training recipes (YAML files), installed as `debiformer.recipes`."""
