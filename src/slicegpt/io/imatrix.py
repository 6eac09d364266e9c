"""A slice's importance (io/importance_file.py) as llama.cpp's GGUF importance-matrix file.

The layout is the one `llama-imatrix` writes and `llama-quantize --imatrix` reads
(llama.cpp's tools/imatrix/imatrix.cpp and common/imatrix-loader.cpp): a GGUF file with
`general.type = "imatrix"`, the keys `imatrix.datasets` (strings), `imatrix.chunk_count`
and `imatrix.chunk_size` (u32), and per weight two F32 tensors named after the model's
GGUF tensor: `blk.0.attn_q.weight.in_sum2`, the sum over tokens of each input column's
square (one row), and `blk.0.attn_q.weight.counts`, the number of tokens (one value). The
quantizer divides the one by the other, so only the mean squares matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slicegpt.errors import SliceGPTError
from slicegpt.io.gguf_export import GLOBAL_TENSORS, LAYER_TENSORS

IMATRIX_SUFFIX = ".imatrix.gguf"


def imatrix_path_for(out: Path) -> Path:
    """Where the importance matrix of the GGUF file `out` goes: beside it, model.gguf -> model.imatrix.gguf."""
    return out.with_name(out.name[: -len(".gguf")] + IMATRIX_SUFFIX)


def gguf_weight_name(path: str) -> str | None:
    """The GGUF name of the weight of the linear at module `path` ("model.layers.3.mlp.down_proj"
    -> "blk.3.ffn_down.weight"), or None where GGUF has no place for it."""
    import gguf

    if path in GLOBAL_TENSORS:
        kind, block = GLOBAL_TENSORS[path], None
    else:
        prefix, _, rest = path.partition("model.layers.")
        index, _, local = rest.partition(".")
        if prefix or not index.isdigit() or local not in LAYER_TENSORS:
            return None
        kind, block = LAYER_TENSORS[local], int(index)
    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=block) + ".weight"


def imatrix_entries(importance: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """GGUF weight name -> mean squares (float32), for every linear GGUF has a place for."""
    entries = {}
    for path, values in importance.items():
        name = gguf_weight_name(path)
        if name is not None:
            entries[name] = np.asarray(torch.as_tensor(values, dtype=torch.float32).numpy(), dtype=np.float32)
    if not entries:
        raise SliceGPTError("no importance for any GGUF tensor (is this a Llama, Mistral, Qwen2 or Qwen3 model?)")
    return entries


def write_imatrix(importance: dict[str, torch.Tensor], tokens: int, path: str | Path,
                  dataset: str = "slicegpt calibration", chunk_size: int = 2048) -> Path:
    """Write llama.cpp's GGUF imatrix file: in_sum2 = mean square x tokens, counts = tokens."""
    import gguf

    path = Path(path)
    tokens = max(int(tokens), 1)
    writer = gguf.GGUFWriter(path, "imatrix")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset or "slicegpt calibration"])
    writer.add_uint32("imatrix.chunk_count", max(tokens // max(chunk_size, 1), 1))
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, means in sorted(imatrix_entries(importance).items()):
        writer.add_tensor(f"{name}.in_sum2", (means.astype(np.float64) * tokens).astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.full((1, 1), float(tokens), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF weight name -> mean squares, from a GGUF imatrix file (ours or llama-imatrix's)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            counts = tensors.get(base + ".counts")
            if counts is None:
                raise SliceGPTError(f"{path}: {name} has no counts")
            out[base] = (sums.reshape(len(counts), -1) / np.maximum(counts, 1)[:, None]).reshape(-1).astype(np.float32)
    return out
