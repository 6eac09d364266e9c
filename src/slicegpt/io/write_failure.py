"""A disk that fills (or a quota that runs out) in the middle of a write: one message, not a traceback.

The up-front checks cannot promise the space a run needs: other processes write too. Every
output is written into a temporary beside it and renamed into place, the temporary removed
on any error, so a failed write leaves no partial output; what reaches the CLI is the
OSError (ENOSPC, EDQUOT), or safetensors' own error, which carries the errno only in its
text ("(os error 28)"). `no_space_message` finds either, through chained exceptions too.
"""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager
from pathlib import Path

NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up"}
RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)(?: at path \"([^\"]+)\")?")


def _errno_and_path(error: BaseException) -> tuple[int | None, str | None]:
    if isinstance(error, OSError):
        return error.errno, error.filename
    if type(error).__name__ == "SafetensorError":
        found = RUST_IO_ERROR.search(str(error))
        if found:
            return int(found.group(1)), found.group(2)
    return None, None


def no_space_message(error: BaseException) -> str | None:
    """The one line to end with when `error` (or one it was raised from) is a full disk; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code, path = _errno_and_path(error)
        if code in NO_SPACE:
            where = f" while writing {path}" if path else ""
            return (f"{NO_SPACE[code]}{where}; the output was not written and its temporaries are removed: "
                    "free some space, or choose an --out on another disk, and run the command again")
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def removed_on_failure(path: str | Path):
    """Remove the temporary file `path` if the block writing it fails: a half-written shard holds
    space that a full disk needs back, and a rerun writes it again anyway."""
    try:
        yield
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
