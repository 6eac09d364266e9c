"""Give written files the permissions a plain `open()` or `mkdir()` would.

Atomic writers go through private temporaries: `tempfile.mkdtemp` makes its directory
0700, and safetensors' `save_file` writes its file 0600 (it renames a temporary into
place). A model directory is meant to be shared like any other output, so once written
its files get 0666 and its directories 0777, less the process's umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, and set it back
    os.umask(mask)
    return mask


def ordinary_permissions(path: str | Path) -> None:
    """Set `path`, and everything under it if it is a directory, to the umask's default modes."""
    path = Path(path)
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
