"""Option values: counts, fractions, seeds, threads and devices, each refused by the flag that set it.

The rules on values live in slicegpt/checks.py, where the Python API's configs call them
with the argument's name; here they are applied to parsed options, naming the flag. The
refusals are ValueErrors (a value out of range) and TypeErrors (not a number) as well.
Checks that read `getattr(values, name)` serve a config dataclass whose fields share the
options' names, with its field names in the messages.
"""

from __future__ import annotations

import os

from slicegpt.checks import (SLICE_COUNTS, check_at_least, check_fraction, check_number,  # noqa: F401
                             check_positive, check_ppl_values, check_slice_values, check_zeroshot_values)
from slicegpt.errors import SliceGPTError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- the same rules on parsed options -----------------------------------------------------------

def at_least(args, name: str, low: int | float, option: str | None = None) -> None:
    """`args.<name>` is at least `low` (None, an option not given, passes)."""
    check_at_least(getattr(args, name, None), low, option or flag(name))


def positive(args, name: str, option: str | None = None) -> None:
    check_positive(getattr(args, name, None), option or flag(name))


def fraction(args, name: str, low_open: bool, high_open: bool, option: str | None = None) -> None:
    """`args.<name>` lies in an interval of [0, 1] (open or closed at each end)."""
    check_fraction(getattr(args, name, None), option or flag(name), low_open, high_open)


THREADS_PER_CPU = 4  # past a few threads per CPU a run only slows; far past it, threads fail to start


SEED_LIMIT = 2**63  # torch seeds its generators from a 64-bit integer


def seed_range(args, name: str = "seed", option: str | None = None) -> None:
    """`args.<name>` is a seed a 64-bit signed integer holds (None passes)."""
    value = getattr(args, name, None)
    if value is not None and not -SEED_LIMIT <= value < SEED_LIMIT:
        raise SliceGPTError(f"{option or flag(name)} must be a 64-bit integer (from -2**63 to 2**63 - 1), got {value}")


def text_list(texts, name: str) -> None:
    """`texts` is a collection of strings, not one string (taken as one row per character) or one row's dict."""
    if isinstance(texts, (str, bytes, dict)):
        hint = " (wrap one text in a list)" if isinstance(texts, str) else ""
        raise TypeError(f"{name} must be a list of strings, got one {type(texts).__name__}{hint}")
    for index, text in enumerate(texts if isinstance(texts, (list, tuple)) else []):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a string, got {type(text).__name__}")


def check_threads(args) -> None:
    """At least one thread, and at most THREADS_PER_CPU per CPU: torch takes any number, and one
    the system cannot start ends the run later, with a traceback."""
    at_least(args, "threads", 1)
    cpus = os.cpu_count()
    threads = getattr(args, "threads", None)
    if cpus and threads is not None and threads > THREADS_PER_CPU * cpus:
        raise SliceGPTError(f"--threads {threads} is more than this machine runs usefully: at most "
                            f"{THREADS_PER_CPU * cpus} ({THREADS_PER_CPU} per CPU, {cpus} CPUs)")


def check_ppl_options(args, prefix: str = "") -> None:
    """Perplexity's options, `--chunks` or `--ppl-chunks` and so on (see check_ppl_values)."""
    name = prefix.replace("-", "_")
    check_ppl_values(getattr(args, f"{name}chunks", None), getattr(args, f"{name}seqlen", None),
                     getattr(args, f"{name}batch_size", None),
                     (f"--{prefix}chunks", f"--{prefix}seqlen", f"--{prefix}batch-size"))


DEVICE_KINDS = ("cpu", "cuda", "mps")


def check_device(device: str) -> None:
    """A device this torch can run on: cpu, cuda or cuda:N with that GPU visible, or mps."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise SliceGPTError(f"--device {device} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type not in DEVICE_KINDS:
        raise SliceGPTError(f"--device {device} is not supported; use cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise SliceGPTError(f"--device {device}: this torch ({torch.__version__}) is built without CUDA; "
                                "use --device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise SliceGPTError(f"--device {device}: no GPU is visible to this process; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise SliceGPTError(f"--device {device}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SliceGPTError(f"--device {device}: this machine or torch build has no MPS; use --device cpu")
