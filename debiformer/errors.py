"""The one exception type for bad user input: the CLI prints its message as a one-line error."""


class UserError(Exception):
    """Bad input (recipe, path, checkpoint, image size): the message says what is wrong and how to fix it."""
