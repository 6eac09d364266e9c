"""One run per output at a time: an exclusive lock held by the operating system.

Two runs into the same output would share its `.NAME.partial` checkpoint and publish a
model assembled from both (layers of one width, a config of another). So every command
that writes takes `flock(LOCK_EX)` on `.NAME.lock` beside the output before any work and
keeps it until it exits. The kernel drops the lock when the process ends in any way,
kill -9 included, so a crashed run never blocks the next one, and the next one resumes
from the checkpoint as before. The lock file holds the holder's process id and command
line, so a refused run can say which run holds the output.

The file is removed when the lock is released; a run that finds a file it cannot lock
reads who holds it, and a run that locks a file another has just removed tries again.
On a filesystem without locks (NFSv3 without its lock daemon, some FUSE mounts) the run
says so once and goes on unlocked; it never removes a lock file it did not hold.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from slicegpt.errors import SliceGPTError


def lock_path(out: str | Path) -> Path:
    """`.NAME.lock` beside the output, found through symbolic links so that two spellings of
    one output share one lock."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.lock"


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as written there ('pid N: command'); waits briefly for a
    holder that has just taken it and not yet written its name."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.01)
    return "process id unknown"


def _created_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return the ones created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


# flock's answers on filesystems that cannot lock at all: NFSv3 without a lock daemon (ENOLCK),
# some FUSE mounts (ENOSYS), others (EOPNOTSUPP). The run goes on unlocked and says so once.
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_warned: set[Path] = set()


def _warn_unlocked(out: Path, path: Path, error: OSError) -> None:
    if path not in _warned:
        _warned.add(path)
        print(f"slicegpt: warning: cannot lock the output {out} ({path}: {error.strerror}): this filesystem has no "
              "locks; going on without one, so make sure no other run writes to it", file=sys.stderr, flush=True)


def _take(path: Path, out: Path) -> tuple[int | None, bool]:
    """(fd, held): the lock file opened and locked; (None, False) where the filesystem cannot lock.
    Retries when the previous holder removed the file between our open and our lock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise SliceGPTError(f"cannot lock the output {out} ({path}): {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SliceGPTError(
                f"{out} is being written by another slicegpt run ({holder(path)}); one output takes one run at "
                "a time: wait for that run to finish or stop it, or choose another --out") from None
        except OSError as error:
            os.close(fd)
            if error.errno in UNSUPPORTED:
                _warn_unlocked(out, path, error)
                return None, False
            raise SliceGPTError(f"cannot lock the output {out} ({path}): {error.strerror}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, True
        os.close(fd)


@contextmanager
def output_lock(out: str | Path):
    """Hold the output `out` (a directory or a file, and its `.partial` beside it) for the block.

    Where the filesystem cannot lock, the block runs unlocked after one warning, and the lock
    file, which this run never held, is left where it is."""
    out = Path(out)
    path = lock_path(out)
    try:
        created = _created_parents(path.parent)
    except OSError as error:
        raise SliceGPTError(f"cannot create {path.parent} for the output {out}: {error.strerror}") from None
    fd, held = None, False
    try:
        fd, held = _take(path, out)
        if held:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {' '.join(['slicegpt', *sys.argv[1:]])}\n".encode())
        yield path
    finally:
        if held:
            try:
                path.unlink()  # still ours: nobody else can hold it while we do
            except OSError:
                pass
        if fd is not None:
            os.close(fd)
        for directory in created:  # a run that wrote nothing leaves no empty folders behind
            try:
                directory.rmdir()
            except OSError:
                break


@contextmanager
def output_locks(outputs: list[str | Path]):
    """Hold several outputs (in a fixed order, so two runs never wait on each other crosswise)."""
    with ExitStack() as stack:
        for out in sorted({str(Path(o).resolve()) for o in outputs}):
            stack.enter_context(output_lock(out))
        yield
