"""How much each input column of every kept linear matters: llama.cpp's importance matrix.

llama.cpp's quantizer weighs the rounding error of weight W[o, i] by the mean square of
input column i on calibration text (its "imatrix", which users otherwise compute with
`llama-imatrix`). Slicing has that statistic already, in the output's own coordinates:
- a linear that reads the residual stream (q, k, v; gate, up; the head) sees the bare
  RMS-normed stream n = x / rms(x) after fusion, rotated into its point's basis and
  sliced, so its mean squares are diag(Q_k^T E[n^T n] Q_k): the diagonal of the
  normalised stream covariance in the kept basis;
- the attention output and MLP down projections read what their block computes, which
  rotation leaves in its own coordinates: their inputs' mean squares are summed by a
  forward hook in the pass that already runs the layer.
A PCA basis puts most of the stream's energy in a few leading coordinates; without these
weights a quantizer spends its error as if every coordinate carried the same signal.

Per-block bases run every block as it is kept, so hooks read all its linears' inputs exactly.
Shared bases take the readers' from the dense pass's normed covariances, each held (float32,
width^2) until its group's basis is fixed: with one basis for the model, 2L+1 of them at once
(SmolLM2-135M: 81 MB; a 4096-wide 32-layer model: 4.4 GB, over HOLD_LIMIT_BYTES, so there the
readers are left out). The projections' inputs come from
the dense pass there too (the sliced model's differ by its error).

Names are the plain model's module paths ("model.layers.0.self_attn.q_proj"); values are
float32 mean squares, one per input column; `tokens` is how many tokens each mean is over.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from slicegpt.architectures.family import Family, get_module
from slicegpt.method.pca import _comm_device, _distributed
from slicegpt.method.points import EMBEDDINGS, layer_of, layer_output, mlp_input

# In a subfolder, out of the weights' file pattern: vLLM loads every top-level *.safetensors of
# a model directory as weights (and transformers reads model*.safetensors or the index).
IMPORTANCE_FILE = "importance/mean_squares.safetensors"
LEGACY_IMPORTANCE_FILE = "importance.safetensors"  # beside the weights in earlier outputs: read, never written
# Shared bases hold the readers' covariances only up to this many bytes at once: past it (a
# 4096-wide model with one basis would hold 4.4 GB) the readers' importance is left out, so
# that keeping it never costs a large model its memory bound; the projections' is kept.
HOLD_LIMIT_BYTES = 1 << 30


def holds_reader_covariances(width: int, points: int, group_size: int | None) -> bool:
    """Whether a shared-basis pass keeps the readers' importance: the covariances one group
    holds until its basis is fixed (float32, width^2 each) stay under HOLD_LIMIT_BYTES."""
    held = points if group_size is None else min(points, 2 * group_size + 1)
    return held * width * width * 4 <= HOLD_LIMIT_BYTES


class InputSquares:
    """Per-column sums of squares of the inputs of named linears (float64), with token counts.

    `mask` is the current batch's padding mask (None: every token counts); the pass that runs
    the layer sets it before each batch."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.mask: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.mask is not None and self.mask.numel() == x.shape[0]:
            x = x[self.mask.reshape(-1).to(torch.bool)]
        squares = x.double().pow(2).sum(0)
        self.sums[name] = squares if name not in self.sums else self.sums[name] + squares
        self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

    @contextmanager
    def watching(self, layer: nn.Module, paths: dict[str, str]):
        """Sum the inputs of the modules at `paths` (path in `layer` -> name) while the block runs.
        A path that is no module (fused expert weights of a mixture of experts) is skipped."""
        handles = [module.register_forward_pre_hook(lambda module, args, name=name: self.add(name, args[0]))
                   for path, name in paths.items() if (module := _module_at(layer, path)) is not None]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def all_reduce(self) -> None:
        """Sum across torch.distributed ranks, where a process group is running."""
        if not _distributed():
            return
        import torch.distributed as dist

        for name in sorted(self.sums):
            device = _comm_device(self.sums[name].device)
            total = torch.cat([self.sums[name], torch.tensor([float(self.tokens[name])], dtype=torch.float64)]).to(device)
            dist.all_reduce(total)
            self.sums[name], self.tokens[name] = total[:-1].cpu(), int(total[-1].item())

    def means(self) -> dict[str, list[float]]:
        return {name: (total / max(self.tokens[name], 1)).float().tolist() for name, total in self.sums.items()}


def _module_at(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_module(layer, path)
    except AttributeError:
        return None


def kept_diagonal(covariance: torch.Tensor, tokens: int, basis: torch.Tensor) -> list[float]:
    """The mean squares of x Q_k per column: diag(Q_k^T C Q_k) / tokens, C = sum of x^T x."""
    Q = basis.to(covariance.device, torch.float64)
    return ((covariance.double() @ Q) * Q).sum(0).div(max(tokens, 1)).float().tolist()


def layer_path(family: Family, index: int, path: str) -> str:
    return f"{family.layers}.{index}.{path}"


def readers_of(point: str, family: Family, layers: int, parallel: bool) -> list[str]:
    """The linears (model paths) that read the stream at `point` through a norm."""
    if point == EMBEDDINGS or point.endswith(" output"):
        index = 0 if point == EMBEDDINGS else layer_of(point) + 1
        if index == layers:
            return [family.head]
        local = family.for_layer(index)
        paths = local.attn_inputs + (local.mlp_inputs if parallel else ())
        return [layer_path(family, index, p) for p in paths]
    index = layer_of(point)
    return [layer_path(family, index, p) for p in family.for_layer(index).mlp_inputs]


def writer_paths(family: Family, index: int) -> dict[str, str]:
    """A layer's attention-output and MLP-down projections: path in the layer -> model path."""
    local = family.for_layer(index)
    return {p: layer_path(family, index, p) for p in (*local.writers("attn"), *local.writers("mlp"))}


def point_names(index: int, parallel: bool) -> tuple[str, ...]:
    return (layer_output(index),) if parallel else (mlp_input(index), layer_output(index))


def importance_tensors(importance: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in importance.items()}


def save_importance(importance: dict[str, list[float]], tokens: int) -> bytes:
    """The safetensors bytes of a slice's importance (IMPORTANCE_FILE)."""
    from safetensors.torch import save

    return save(importance_tensors(importance), metadata={"tokens": str(tokens), "statistic": "mean square of "
                                                          "each input column on the calibration text"})


def importance_path(directory: str | Path) -> Path | None:
    """The importance file of a sliced directory (or where earlier versions put it); None if it has none."""
    return next((p for p in (Path(directory) / IMPORTANCE_FILE, Path(directory) / LEGACY_IMPORTANCE_FILE)
                 if p.is_file()), None)


def load_importance(path) -> tuple[dict[str, torch.Tensor], int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tokens = int((f.metadata() or {}).get("tokens", 1))
        return {name: f.get_tensor(name) for name in f.keys()}, tokens
