"""Option values: counts, fractions, seeds, threads and devices, each refused by the flag that set it.

The checks read `getattr(values, name)`, so a config dataclass whose fields share the
options' names is checked by the same call, with its field names in the messages.
"""

from __future__ import annotations

import math

from slicegpt.errors import SliceGPTError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def at_least(args, name: str, low: int | float, option: str | None = None) -> None:
    """`args.<name>` is at least `low` (None, an option not given, passes)."""
    value = getattr(args, name, None)
    if value is not None and not value >= low:
        raise SliceGPTError(f"{option or flag(name)} must be at least {low:g}, got {value:g}")


def positive(args, name: str, option: str | None = None) -> None:
    value = getattr(args, name, None)
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise SliceGPTError(f"{option or flag(name)} must be a positive number, got {value:g}")


def fraction(args, name: str, low_open: bool, high_open: bool, option: str | None = None) -> None:
    """`args.<name>` lies in an interval of [0, 1] (open or closed at each end)."""
    value = getattr(args, name, None)
    if value is None:
        return
    above = value > 0 if low_open else value >= 0
    below = value < 1 if high_open else value <= 1
    if not (above and below):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise SliceGPTError(f"{option or flag(name)} must be in {interval}, got {value:g}")


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
    at_least(args, "threads", 1)


def check_ppl_options(args, prefix: str = "") -> None:
    """Perplexity's chunk count, chunk length (two tokens at least: one predicts the other) and batch size."""
    name = prefix.replace("-", "_")
    at_least(args, f"{name}chunks", 1, f"--{prefix}chunks")
    at_least(args, f"{name}seqlen", 2, f"--{prefix}seqlen")
    at_least(args, f"{name}batch_size", 1, f"--{prefix}batch-size")


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
