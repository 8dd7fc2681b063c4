"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class LoraToolsError(Exception):
    """A user-facing error: bad input, bad option, refused operation. One line, no traceback."""
