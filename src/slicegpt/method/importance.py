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
Shared bases take the readers' from the dense pass's normed covariances C, each held (float32,
width^2) until its group's basis is fixed: with one basis for the model, 2L+1 of them at once
(SmolLM2-135M: 81 MB; a 4096-wide 32-layer model: 4.4 GB). Past HOLD_LIMIT_BYTES none is held.
No smaller statistic of that pass gives diag(Q_k^T C Q_k) exactly: Q_k is known only once every
point is in, and may point anywhere, so C is needed in every direction (a sum over points gives
only their total). Instead the rotation pass, which knows every basis, runs each dense layer on
the dense stream (the refit's dense forward where there is one, else one more dense forward) and
sums each point's normed tokens in its kept basis, squared (`ReaderSquares`): the same means to
float rounding, over the same sequences (with the refit, over the refit's: --refit-share), in
sums one width long; the stream lives where the store keeps activations (in memory, or spilled
to disk). The projections' inputs come from the dense pass there too (the sliced model's differ
by its error).

Names are the plain model's module paths ("model.layers.0.self_attn.q_proj"); values are
float32 mean squares, one per input column; `tokens` is how many tokens each mean is over.
A slice keeps them beside its weights (io/importance_file.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from slicegpt.architectures.family import Family, get_module
from slicegpt.method.pca import _comm_device, _distributed, rms_normed
from slicegpt.method.points import EMBEDDINGS, layer_input, layer_of, layer_output, mlp_input

# Shared bases hold the readers' covariances only up to this many bytes at once (read when
# called, so tests may lower it): past it (a 4096-wide model with one basis would hold 4.4 GB)
# the rotation pass measures the readers' importance instead.
HOLD_LIMIT_BYTES = 1 << 30


def holds_reader_covariances(width: int, points: int, group_size: int | None) -> bool:
    """Whether a shared-basis pass keeps the readers' importance: the covariances one group
    holds until its basis is fixed (float32, width^2 each) stay under HOLD_LIMIT_BYTES (else the
    rotation pass measures it: `ReaderSquares`)."""
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


def kept_coordinates(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The RMS-normed tokens of `x` in the kept basis: what the stream's readers will read. In
    float32 (float64 where `x` is), as the covariances are taken."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return rms_normed(x.to(compute)) @ basis.to(x.device, compute)


class ReaderSquares:
    """The readers' importance, measured in the rotation pass where the covariance pass held none
    of their covariances (see the module's docstring): while a dense layer runs over the dense
    stream, hooks on its norms sum each point's tokens in its kept basis, squared."""

    def __init__(self, family: Family, layers: int, masks: list):
        self.family, self.layers, self.masks = family, layers, masks

    def _taps(self, index: int, bases: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
        """A layer's norms that read a stream point: norm path -> (the point, its kept basis)."""
        local, point = self.family.for_layer(index), layer_input(index)
        taps = {local.attn_norm: (point, bases[point])}
        if mlp_input(index) in bases and not self.family.parallel:
            taps[local.mlp_norm] = (mlp_input(index), bases[mlp_input(index)])
        return taps

    @contextmanager
    def watching(self, layer: nn.Module, index: int, bases: dict[str, torch.Tensor], into: dict):
        """While the dense `layer` (fused, not rotated) runs over the stream, batch by batch in
        order, sum what its readers will read; the means go into `into` (reader path -> values).
        A norm's n-th call is the n-th batch, which gives each call its padding mask."""
        squares, calls, handles = InputSquares(), {}, []
        for path, (point, basis) in self._taps(index, bases).items():
            def add(module, args, path=path, point=point, basis=basis):
                squares.mask = self.masks[calls.setdefault(path, 0)]
                calls[path] += 1
                squares.add(point, kept_coordinates(args[0], basis))
            handles.append(get_module(layer, path).register_forward_pre_hook(add))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if any(count != len(self.masks) for count in calls.values()) or len(calls) != len(handles):
            raise RuntimeError(f"layer {index}'s norms did not run once per batch ({calls})")
        self._finish(squares, into)

    def head(self, acts, basis: torch.Tensor, into: dict) -> None:
        """The head's readers, from the last layer's dense outputs."""
        squares, point = InputSquares(), layer_output(self.layers - 1)
        for x, mask in zip(acts.hidden, acts.masks):
            squares.mask = mask
            squares.add(point, kept_coordinates(x, basis))
        self._finish(squares, into)

    def _finish(self, squares: InputSquares, into: dict) -> None:
        squares.all_reduce()
        for point, means in squares.means().items():
            for reader in readers_of(point, self.family, self.layers, self.family.parallel):
                into[reader] = means


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
