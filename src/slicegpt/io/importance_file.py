"""The importance file a slice keeps beside its weights: each kept linear's input mean squares.

method/importance.py measures them while slicing; this module is the one place that writes
and reads the file. It is a safetensors file, one float32 tensor per linear named by the
plain model's module path ("model.layers.0.self_attn.q_proj"), with the number of
calibration tokens in its metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

# In a subfolder, out of the weights' file pattern: vLLM loads every top-level *.safetensors of
# a model directory as weights (and transformers reads model*.safetensors or the index).
IMPORTANCE_FILE = "importance/mean_squares.safetensors"
LEGACY_IMPORTANCE_FILE = "importance.safetensors"  # beside the weights in earlier outputs: read, never written


def importance_bytes(importance: dict[str, list[float]], tokens: int) -> bytes:
    """The file's content: `importance` (module path -> mean squares) over `tokens` tokens."""
    from safetensors.torch import save

    tensors = {name: torch.tensor(values, dtype=torch.float32) for name, values in importance.items()}
    return save(tensors, metadata={"tokens": str(tokens),
                                   "statistic": "mean square of each input column on the calibration text"})


def importance_files(importance: dict[str, list[float]] | None, tokens: int) -> dict[str, bytes]:
    """The importance file among a checkpoint's extra files (name -> content); none where a run
    collected no importance."""
    return {IMPORTANCE_FILE: importance_bytes(importance, tokens)} if importance else {}


def importance_path(directory: str | Path) -> Path | None:
    """The importance file of a sliced directory (or where earlier versions put it); None if it has none."""
    return next((p for p in (Path(directory) / IMPORTANCE_FILE, Path(directory) / LEGACY_IMPORTANCE_FILE)
                 if p.is_file()), None)


def read_importance(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """(module path -> mean squares, tokens) from an importance file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tokens = int((f.metadata() or {}).get("tokens", 1))
        return {name: f.get_tensor(name) for name in f.keys()}, tokens


def carried_importance(directory: str | Path) -> dict[str, bytes]:
    """The importance file of `directory` among the extra files of a checkpoint written from it,
    under the current name (an earlier output's file moves into the subfolder); none if it has none."""
    path = importance_path(directory)
    return {IMPORTANCE_FILE: path.read_bytes()} if path is not None else {}
