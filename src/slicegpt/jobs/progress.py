"""What a job tells people while it runs: progress on stderr (stdout stays parseable), and how long each step took."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


def say(message: str) -> None:
    """Progress for people goes to stderr, so stdout stays parseable."""
    print(message, file=sys.stderr, flush=True)
