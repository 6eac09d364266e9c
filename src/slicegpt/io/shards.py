"""Read and write Hugging Face safetensors checkpoints a few tensors at a time.

Reading opens only the shard files that hold the requested tensors (`safe_open` maps a
file and copies out just the named tensors). Writing puts each piece of the model in its
own shard, written atomically, and the index that `from_pretrained` reads is rebuilt
from the shards' headers, so an interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slicegpt.errors import SliceGPTError
from slicegpt.io.permissions import ordinary_permissions
from slicegpt.io.write_failure import removed_on_failure

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


@contextmanager
def open_safetensors(path: Path):
    """`safe_open` on the CPU, with a damaged or truncated file reported as bad input."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as error:
        raise SliceGPTError(damaged_file_message(path, error)) from None


def damaged_file_message(path: str | Path, error: Exception) -> str:
    return f"cannot read {path}: the file is damaged or truncated ({error})"


class SafetensorsCheckpoint:
    """The tensors of a model directory (one model.safetensors or sharded with an index)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise SliceGPTError(f"cannot read {index}: {error}") from None
        elif single.is_file():
            with open_safetensors(single) as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise SliceGPTError(f"streaming needs safetensors weights in {self.directory} "
                                f"({SINGLE_FILE} or {INDEX_FILE}); found neither")
        missing = {f for f in self.weight_map.values() if not (self.directory / f).is_file()}
        if missing:
            raise SliceGPTError(f"{self.directory}: shard files named in the index are missing: "
                                f"{', '.join(sorted(missing))}")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def files(self) -> list[Path]:
        return [self.directory / f for f in sorted(set(self.weight_map.values()))]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed (unmapped) afterwards."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise SliceGPTError(f"tensor {name} is not in the checkpoint {self.directory}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, group in by_file.items():
            with open_safetensors(self.directory / file) as f:
                for name in group:
                    tensors[name] = f.get_tensor(name)
        return tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the shard headers only."""
        shapes = {}
        for path in self.files():
            with open_safetensors(path) as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return shapes

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes().values())


def shard_name(index: int, total: int) -> str:
    """Hugging Face's shard naming, 1-based."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def write_shard(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one shard atomically: a crash leaves either the old file or the whole new one."""
    final = Path(directory) / name
    tmp = final.with_name(f".{name}.tmp")
    with removed_on_failure(tmp):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, final)
    ordinary_permissions(final)  # save_file writes 0600


def write_index(directory: Path) -> dict:
    """Write model.safetensors.index.json for the shards in `directory`; returns the index."""
    directory = Path(directory)
    shards = sorted(p for p in directory.iterdir() if _SHARD.fullmatch(p.name))
    totals = {_SHARD.fullmatch(p.name).group(2) for p in shards}
    expected = int(totals.pop()) if len(totals) == 1 else -1
    if not shards or totals or len(shards) != expected:
        raise SliceGPTError(f"{directory}: expected a complete set of shards, found {[p.name for p in shards]}")
    weight_map, total_size, total_parameters = {}, 0, 0
    for path in shards:
        with open_safetensors(path) as f:
            for name in f.keys():
                tensor_slice = f.get_slice(name)
                count = math.prod(tensor_slice.get_shape())
                weight_map[name] = path.name
                total_parameters += count
                total_size += count * _dtype_bytes(tensor_slice.get_dtype())
    index = {"metadata": {"total_size": total_size, "total_parameters": total_parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _dtype_bytes(name: str) -> int:
    bits = re.search(r"(\d+)", name)
    return int(bits.group(1)) // 8 if bits else 1
