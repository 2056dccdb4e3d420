"""The one exception type for bad user input: the CLI prints its message as a one-line error.

A message names settings the way the library does: recipe keys (`train.device`) as they are, and
function parameters through mentions, `{name}` or `{name=value}` in the text (`mention` writes
one inside an f-string). `str(error)` shows a mention as the parameter (`fresh`, `mode=infer`);
`render` shows it in a caller's own vocabulary, e.g. as the command-line flag that sets it. A
message quotes a value the user gave through `quoted`, which keeps it short.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping

MENTION = re.compile(r"\{([a-z_][a-z0-9_]*)(?:=([^{}]*))?\}")
QUOTE_LIMIT = 60  # characters of a value a message quotes


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as a message quotes it: its repr, cut to `limit` characters ("..." marks a cut).
    The repr is built a few levels and items deep only, so a huge value (a YAML alias bomb)
    costs no time and still makes a short line."""
    shortened = reprlib.Repr()
    shortened.maxlevel = 3
    shortened.maxstring = shortened.maxother = limit
    text = shortened.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def mention(name: str, value: object = None) -> str:
    """A mention of the parameter `name` (set to `value`, if given) for a `UserError` message."""
    return f"{{{name}}}" if value is None else f"{{{name}={value}}}"


class UserError(Exception):
    """Bad input (recipe, path, checkpoint, image size): the message says what is wrong and how to
    fix it. `about` names the setting it is about, a parameter or a recipe key; it is shown before
    the message, followed by a space unless the message starts with a colon."""

    def __init__(self, message: str, *, about: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.about = about

    def __str__(self) -> str:
        return self.render({})

    def render(self, names: Mapping[str, str]) -> str:
        """The message with `about` and each mention called what `names` (parameter -> name)
        says (a "name=value" mention reads as that name, a space and the value); a parameter
        missing from `names` keeps its own name. `names` may also hold a "name=value" mention
        whole, for a name that carries its value (a switch)."""

        def name(match: re.Match) -> str:
            parameter, value = match[1], match[2]
            if value is None:
                return names.get(parameter, parameter)
            whole = f"{parameter}={value}"
            if whole in names:
                return names[whole]
            return f"{names[parameter]} {value}" if parameter in names else whole

        text = MENTION.sub(name, self.message)
        if self.about is None:
            return text
        separator = "" if text.startswith(":") else " "
        return f"{names.get(self.about, self.about)}{separator}{text}"
