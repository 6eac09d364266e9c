"""Calibration activations that live in a file on disk instead of in memory.

`DiskActivations` has the interface of `activations.Activations` (`hidden`, `masks`, `map`, `adopt`),
so the driver and the Slicer run on it unchanged. Batches are written with plain sequential writes and
read back memory-mapped, one batch at a time: a batch's mapping goes away when the
tensor read from it is freed, so resident memory stays at about one batch. Each `map`
writes a new file and deletes the old one, unless a checkpoint still needs it (`pin`).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

# Numbers the files of every store in this process, so two stores in one folder never collide.
_FILE_SERIALS = itertools.count(1)
_DTYPES = {str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class _MappedBatches(Sequence):
    """The batches of one activation file, each memory-mapped when asked for."""

    def __init__(self, store: "DiskActivations"):
        self.store = store

    def __len__(self) -> int:
        return len(self.store.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        store = self.store
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        shape = store.shapes[index]
        nbytes = math.prod(shape) * store.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=store.dtype, device=store.device)
        # Copy-on-write mapping: readers get a writable tensor; nothing goes back to the file.
        raw = np.memmap(store.file, dtype=np.uint8, mode="c", offset=store.offsets[index], shape=(nbytes,))
        return torch.from_numpy(raw).view(store.dtype).view(shape).to(store.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]


class DiskActivations:
    """Calibration activations at one point of the stream, batch by batch, on disk."""

    def __init__(self, directory: str | Path, masks: list, device: torch.device | str = "cpu",
                 prefix: str = "acts"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.masks = masks
        self.device = torch.device(device)
        self.prefix = prefix
        self.file: Path | None = None
        self.shapes: list[tuple[int, ...]] = []
        self.offsets: list[int] = []
        self.dtype = torch.float32
        self.pinned: set[Path] = set()

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) for s in self.shapes) * self.itemsize

    @property
    def hidden(self) -> _MappedBatches:
        return _MappedBatches(self)

    @hidden.setter
    def hidden(self, batches: list[torch.Tensor]) -> None:
        self._write(iter(batches))

    def map(self, fn: Callable[..., torch.Tensor], *per_batch: list) -> None:
        """Replace each batch by fn(batch, *its extras), streaming from one file into the next."""
        extras = zip(*per_batch) if per_batch else [()] * len(self.shapes)
        self._write(fn(x, *e) for x, e in zip(self.hidden, extras))

    def _write(self, batches: Iterator[torch.Tensor]) -> None:
        path = self.directory / f"{self.prefix}-{os.getpid()}-{next(_FILE_SERIALS)}.bin"
        shapes, offsets, dtype, offset = [], [], None, 0
        with open(path, "wb") as f:
            for batch in batches:
                batch = batch.detach().to("cpu").contiguous()
                if dtype is None:
                    dtype = batch.dtype
                elif batch.dtype != dtype:
                    raise TypeError(f"activation batches must share one dtype, got {dtype} and {batch.dtype}")
                f.write(batch.view(-1).view(torch.uint8).numpy().data if batch.numel() else b"")
                shapes.append(tuple(batch.shape))
                offsets.append(offset)
                offset += batch.numel() * batch.element_size()
        old = self.file
        self.file, self.shapes, self.offsets = path, shapes, offsets
        self.dtype = dtype or self.dtype
        if old is not None and old not in self.pinned:
            old.unlink(missing_ok=True)

    def adopt(self, other: "DiskActivations") -> None:
        """Take over `other`'s file (the two are the same stream, computed twice); `other` is spent."""
        if not isinstance(other, DiskActivations):
            self.hidden = other.hidden
            return
        old = self.file
        self.file, self.shapes, self.offsets, self.dtype = other.file, other.shapes, other.offsets, other.dtype
        other.file = None
        if old is not None and old not in self.pinned:
            old.unlink(missing_ok=True)

    def pin(self) -> dict:
        """Keep the current file until `release`: a checkpoint refers to it. Returns its description."""
        self.pinned.add(self.file)
        return {"file": self.file.name, "shapes": [list(s) for s in self.shapes], "offsets": self.offsets,
                "dtype": str(self.dtype)}

    def release(self, keep: dict | None = None) -> None:
        """Delete pinned files other than the current one (and `keep`'s)."""
        keep_names = {self.file.name if self.file else None, (keep or {}).get("file")}
        for path in list(self.pinned):
            if path.name not in keep_names:
                path.unlink(missing_ok=True)
                self.pinned.discard(path)

    @classmethod
    def restore(cls, directory: str | Path, description: dict, masks: list, device="cpu",
                prefix: str = "acts") -> "DiskActivations":
        """The store a checkpoint described, reading its (pinned) file."""
        store = cls(directory, masks, device, prefix)
        store.file = store.directory / description["file"]
        store.shapes = [tuple(s) for s in description["shapes"]]
        store.offsets = list(description["offsets"])
        store.dtype = _DTYPES[description["dtype"]]
        store.pinned.add(store.file)
        return store

    def discard(self) -> None:
        """Delete every file this store made or pinned."""
        for path in {*self.pinned, self.file} - {None}:
            path.unlink(missing_ok=True)
        self.pinned.clear()
