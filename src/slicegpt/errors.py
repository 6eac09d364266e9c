"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class SliceGPTError(Exception):
    """A problem with the user's input or environment, explained in its message."""


class BadValue(SliceGPTError, ValueError):
    """A setting out of its range: the CLI's refusal, and a ValueError to a Python caller."""


class BadType(SliceGPTError, TypeError):
    """A setting of the wrong kind (a string for a number, None for a text): a TypeError to a Python caller."""
