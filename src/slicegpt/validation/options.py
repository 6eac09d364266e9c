"""Option values: counts, fractions, seeds, threads and devices, each refused by the flag that set it.

Each rule is a function of a value and the name to blame: the CLI passes the flag
(`--seqlen`), the Python API (`perplexity`, `evaluate_zeroshot`, `SliceConfig`) the
argument's name, so a value one refuses the other refuses too, with the same words. The
refusals are ValueErrors (a value out of range) and TypeErrors (not a number) as well.
Checks that read `getattr(values, name)` serve a config dataclass whose fields share the
options' names, with its field names in the messages.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Callable

from slicegpt.errors import BadType, BadValue, SliceGPTError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- rules on values ----------------------------------------------------------------------------

def check_number(value, name: str, whole: bool = False) -> None:
    """`value` is a real number (an integer where `whole`); a string such as "0.25" is not."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or whole and not isinstance(value, numbers.Integral):
        raise BadType(f"{name} must be {'an integer' if whole else 'a number'}, got {value!r} "
                      f"({type(value).__name__})")


def check_at_least(value, low: int | float, name: str, whole: bool = False) -> None:
    """`value` is at least `low` (None, a setting not given, passes)."""
    if value is None:
        return
    check_number(value, name, whole)
    if not value >= low:
        raise BadValue(f"{name} must be at least {low:g}, got {value:g}")


def check_positive(value, name: str) -> None:
    if value is None:
        return
    check_number(value, name)
    if not (value > 0 and math.isfinite(value)):
        raise BadValue(f"{name} must be a positive number, got {value:g}")


def check_fraction(value, name: str, low_open: bool, high_open: bool) -> None:
    """`value` lies in an interval of [0, 1] (open or closed at each end); None passes."""
    if value is None:
        return
    check_number(value, name)
    above = value > 0 if low_open else value >= 0
    below = value < 1 if high_open else value <= 1
    if not (above and below):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise BadValue(f"{name} must be in {interval}, got {value:g}")


def check_ppl_values(chunks, seqlen, batch_size, names: tuple[str, str, str] = ("chunks", "seqlen", "batch_size"),
                     ) -> None:
    """Perplexity's chunk count, chunk length (two tokens at least: one predicts the other) and batch size."""
    check_at_least(chunks, 1, names[0], whole=True)
    check_at_least(seqlen, 2, names[1], whole=True)
    check_at_least(batch_size, 1, names[2], whole=True)


def check_zeroshot_values(limit, batch_size, names: tuple[str, str] = ("limit", "batch_size")) -> None:
    """Zero-shot's examples per task (lm-eval finds no documents at 0, after building every task) and batch size."""
    check_at_least(limit, 1, names[0], whole=True)
    check_at_least(batch_size, 1, names[1], whole=True)


SLICE_COUNTS = ("round_to", "cal_samples", "cal_seqlen", "cal_batch_size")


def check_slice_values(get: Callable[[str], object], name: Callable[[str], str]) -> None:
    """A slicing run's numbers, by SliceConfig field: `get(field)` reads one (None: not given),
    `name(field)` spells it for the message."""
    for field in SLICE_COUNTS:
        check_at_least(get(field), 1, name(field), whole=True)
    check_fraction(get("sparsity"), name("sparsity"), low_open=False, high_open=True)
    check_fraction(get("target_ratio"), name("target_ratio"), low_open=True, high_open=False)
    check_at_least(get("target_params"), 1, name("target_params"), whole=True)
    for field in ("basis_share", "refit_share"):
        check_fraction(get(field), name(field), low_open=True, high_open=False)


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
