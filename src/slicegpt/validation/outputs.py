"""Output locations: refused before any work when nothing could be written there, or when
writing there would destroy what the run reads.

A run that writes under a regular file, under /proc or /dev/null, or into a directory it
may not write used to find out only when saving, after all the work, and with a
traceback (or, in /proc, a complaint about disk space). An output set to the model itself,
to a folder that holds it, or to slicegpt's cache replaced the model (`--overwrite`) or a
cached conversion that later runs read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from slicegpt.errors import SliceGPTError


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_output_location(out: str | Path, option: str = "--out", kind: str = "directory") -> None:
    """`out` (a directory, or a file when kind is "file") can be created and written where it is."""
    if not str(out).strip():
        raise SliceGPTError(f"{option} is empty; give a {kind}")
    out = Path(out)
    if kind == "file" and out.is_dir():
        raise SliceGPTError(f"{option} {out} is a directory; give a file name")
    if kind == "file" and out.exists() and not out.is_file():
        raise SliceGPTError(f"{option} {out} is not a regular file")
    parent = nearest_existing(Path(os.path.abspath(out)).parent)
    if not parent.is_dir():
        raise SliceGPTError(f"{option} {out}: {parent} is not a directory, so nothing can be written under it")
    try:  # permissions alone say little to root or on read-only and special filesystems; try it
        probe = tempfile.mkdtemp(prefix=".slicegpt-probe-", dir=parent)
    except OSError as error:
        raise SliceGPTError(f"{option} {out}: cannot write in {parent} ({error.strerror})") from None
    os.rmdir(probe)


def check_not_input(out: str | Path, model: str, option: str = "--out") -> None:
    """`out` neither is, holds, nor lies inside the model the run reads."""
    check_writes([out], [("the model", model)], option=option)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def check_writes(outputs: list[str | Path], reads: list[tuple[str, str | Path]], cache: str | Path | None = None,
                 option: str = "--out") -> None:
    """No output is, holds or lies inside a path the run reads, nor slicegpt's cache.

    `reads` are (what, path) pairs: the model, data files, folders; those that do not exist
    (a hub id, a hub dataset) are passed over. An output that holds a path the run reads
    would take it along when replaced (--overwrite); one inside it would change what the run
    reads (a model's config.json). The cache holds the converted models that runs read (a
    named model's folder, a GGUF file's), so only slicegpt writes there. Symbolic links are
    followed: two spellings of one place are one place.
    """
    for out in outputs:
        if not str(out).strip():
            raise SliceGPTError(f"{option} is empty; give a path")
        target = _real(out)
        for what, path in reads:
            if not os.path.lexists(path):
                continue
            source = _real(path)
            if target == source:
                raise SliceGPTError(f"{option} {out} would replace {what} the run reads ({path}); "
                                    f"choose another {option}")
            if source.is_relative_to(target):
                raise SliceGPTError(f"{option} {out} would replace {what} the run reads ({path}), which it "
                                    f"holds; choose another {option}")
            if target.is_relative_to(source):
                raise SliceGPTError(f"{option} {out} lies inside {what} the run reads ({path}); "
                                    f"choose another {option}")
        if cache is not None:
            root = _real(cache)
            if target.is_relative_to(root) or root.is_relative_to(target):
                where = "lies in" if target.is_relative_to(root) else "holds"
                raise SliceGPTError(f"{option} {out} {where} slicegpt's cache ({root}), which holds the converted "
                                    f"models runs read; choose another {option}")


# The longest name a run makes beside its output: `.NAME.partial-XXXXXXXX`, the temporary
# directory a sliced model is written into (io/checkpoint.py); `.NAME.partial`, `.NAME.lock`
# and `.NAME.rft-partial` are shorter.
BESIDE_OUTPUT = len("..partial-") + 8


def check_name_length(out: str | Path, option: str = "--out") -> None:
    """Every name the run creates for `out` fits the filesystem's NAME_MAX: the folders it makes, and
    the output's own name with the longest temporary beside it (a long name used to fail
    when the slice was saved, after all the work)."""
    path = Path(os.path.abspath(out))
    existing = nearest_existing(path)
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return  # the filesystem does not say; saving reports it
    for folder in path.relative_to(existing).parts[:-1] if existing != path else ():
        if len(os.fsencode(folder)) > limit:
            raise SliceGPTError(f"{option} {out}: the folder name {folder[:20]}... is {len(os.fsencode(folder))} "
                                f"bytes; this filesystem allows {limit}")
    size = len(os.fsencode(path.name))
    if size + BESIDE_OUTPUT > limit:
        raise SliceGPTError(f"{option} {out}: the name is {size} bytes, too long for the temporaries the run "
                            f"writes beside it (.NAME.partial-XXXXXXXX) on this filesystem, which allows {limit}; "
                            f"use a name of at most {limit - BESIDE_OUTPUT} bytes")
