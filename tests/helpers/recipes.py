"""Recipe files for tests: a recipe as a dict, some of its sections changed key by key, written
as YAML."""

from pathlib import Path

import yaml


def merge_sections(recipe: dict, **sections: dict) -> dict:
    """`recipe` with each of `sections` merged into its section of that name (their keys win)."""
    merged = dict(recipe)
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def write_recipe(path: Path, recipe: dict, **sections: dict) -> Path:
    """Writes `merge_sections(recipe, **sections)` as YAML at `path`; returns `path`."""
    path.write_text(yaml.safe_dump(merge_sections(recipe, **sections)))
    return path
