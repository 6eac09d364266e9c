"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class SliceGPTError(Exception):
    """A problem with the user's input or environment, explained in its message."""
