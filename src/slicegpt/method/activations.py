"""Calibration activations at one point of the stream, held batch by batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Activations:
    """Calibration activations at one point of the stream, batch by batch."""

    hidden: list[torch.Tensor]
    masks: list[torch.Tensor | None]

    def map(self, fn: Callable[..., torch.Tensor], *per_batch: list) -> None:
        """Replace each batch by fn(batch, *its extras), one batch at a time.

        Done in place, so each old batch is freed as its successor is made (at most one
        batch is held twice); streaming runs swap in a subclass that keeps batches on disk.
        """
        for index, extras in enumerate(zip(*per_batch) if per_batch else [()] * len(self.hidden)):
            self.hidden[index] = fn(self.hidden[index], *extras)

    def adopt(self, other: "Activations") -> None:
        """Take over `other`'s batches (the two are the same stream, computed twice)."""
        self.hidden[:] = list(other.hidden)
