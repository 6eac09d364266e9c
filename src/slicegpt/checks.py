"""Rules on values, each a function of a value and the name to blame for it.

The ground floor of the package: the CLI's checks (validation/options.py, naming the flag)
and the Python API's configs and calls (SliceConfig, perplexity, evaluate_zeroshot, naming
the argument) call the same rule, so a value one refuses the other refuses, in the same words.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

from slicegpt.errors import BadType, BadValue


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
