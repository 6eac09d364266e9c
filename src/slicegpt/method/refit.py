"""Least-squares refit of each sliced layer's output projections (`--refit`).

Slicing drops the stream's least-used directions, and each layer then reads a slightly
wrong input; the errors add up with depth. After a layer is rotated and sliced, the
linear maps that write its blocks' outputs (attention's output projection, the MLP's down
projection, or the map after a post-norm) are refit so that the sliced layer, fed the
sliced model's own stream, comes as close as it can, in least squares over the calibration
tokens, to what the dense layer writes on the dense stream (in the kept coordinates). A
ridge term pulls the weights towards the ones they replace, so directions the calibration
text hardly visits keep their rotated values.

A block's output is (what does not depend on its writer W) + Z W^T, where Z is W's input,
so each block runs once: hooks keep Z while the block runs, the least-squares sums are
taken against the dense target, and once W is solved the block's output is corrected by
Z (W_new - W_old)^T instead of running it again. A sequential layer refits its attention
output against the stream between its blocks, corrects that stream, then runs its MLP half
on it; a parallel layer's writers read the same input and are refit one after the other
from one set of sums. Each layer thus costs one dense and one sliced forward.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn

from slicegpt.architectures.family import Family, get_module
from slicegpt.method.activations import Activations
from slicegpt.method.least_squares import DAMPING, LeastSquares  # noqa: F401  (LeastSquares: the refit's solver)


def refittable(layer: nn.Module, paths: tuple[str, ...]) -> nn.Linear | None:
    """The block's one output projection, where it is a plain linear (not MoE experts)."""
    if len(paths) != 1:
        return None
    owner, _, name = paths[0].rpartition(".")
    module = getattr(get_module(layer, owner) if owner else layer, name)
    return module if isinstance(module, nn.Linear) else None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _BlockFit:
    """The refit of the maps that write one block's output: hooks record their inputs Z while
    the block runs, batch by batch; the sums go to one least-squares problem, and each Z is
    kept to correct the block's output once the new weights are known."""

    def __init__(self, writers: list[nn.Linear]):
        self.writers = writers
        self.inputs: list[list[torch.Tensor] | None] = []  # per batch, each writer's Z
        self.deltas: list[torch.Tensor] = []  # W_new - W_old, once solved
        self._latest: list[torch.Tensor | None] = [None] * len(writers)
        self._handles = [w.register_forward_pre_hook(partial(self._record, k)) for k, w in enumerate(writers)]
        if writers:
            weight = writers[0].weight
            self.solver = LeastSquares(sum(w.weight.shape[1] for w in writers), weight.shape[0], weight.device)

    def _record(self, k: int, module: nn.Module, args: tuple) -> None:
        self._latest[k] = args[0]

    def add(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Count one batch the block has just run on: its output, and what it should have been."""
        if not self.writers:
            return
        Z, self._latest = self._latest, [None] * len(self.writers)
        if any(z is None for z in Z):
            raise RuntimeError("a refit writer did not run with its block")
        self.inputs.append(Z)
        compute = _compute_dtype(output.dtype)
        self.solver.add(Z[0] if len(Z) == 1 else torch.cat(Z, dim=-1), target.to(compute) - output.to(compute),
                        mask)

    def solve(self, damping: float) -> None:
        self.close()
        if not self.writers:
            return
        self.solver.all_reduce()
        solved = self.solver.solve_in_turn([w.weight for w in self.writers], damping)
        for writer, weight in zip(self.writers, solved):
            old = writer.weight.data  # the tensor itself, which the assignment below leaves alone
            writer.weight.data = weight.to(old.dtype).contiguous()
            compute = _compute_dtype(old.dtype)
            self.deltas.append(writer.weight.to(compute) - old.to(compute))
        del self.solver

    def corrected(self, output: torch.Tensor, index: int) -> torch.Tensor:
        """Batch `index`'s output as the block with the new weights writes it (a new tensor;
        the arguments in the order Activations.map passes them)."""
        if not self.writers:
            return output
        Z, self.inputs[index] = self.inputs[index], None
        compute = _compute_dtype(output.dtype)
        result = output.to(compute)
        for z, delta in zip(Z, self.deltas):
            result = result + z.to(compute) @ delta.to(z.device).T
        return result.to(output.dtype)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def refit_layer(dense: nn.Module, sliced: nn.Module, family: Family, dense_acts: Activations,
                sliced_acts: Activations, kwargs: list[dict], Q_mid: torch.Tensor | None, Q_out: torch.Tensor,
                damping: float | None = None) -> None:
    """Refit `sliced` (a layer rotated and sliced) against `dense` (the same layer fused but not
    rotated); then move both streams past the layer. Q_mid and Q_out are the kept bases after
    the attention block (None for a parallel layer) and after the layer. `damping`: the ridge
    weight (default DAMPING, read when called).

    A sequential layer's attention output is fit to the stream between its blocks; a parallel
    layer's, like the MLP's, to the stream after the layer.
    """
    damping = DAMPING if damping is None else damping
    writers = [refittable(sliced, family.writers(part)) for part in ("attn", "mlp")]
    if sliced.parallel:
        _refit_parallel(dense, sliced, dense_acts, sliced_acts, kwargs, Q_out,
                        _BlockFit([w for w in writers if w is not None]), damping)
        return
    attention, mlp = (_BlockFit([] if w is None else [w]) for w in writers)
    masks, batches = sliced_acts.masks, range(len(kwargs))
    mid_targets: list[torch.Tensor | None] = []  # the dense stream between the blocks, in the kept coordinates

    def advance_dense(x, kw):
        mid = dense.attention_half(x, **kw)
        if attention.writers:
            mid_targets.append(mid @ Q_mid.to(mid.device, mid.dtype))
        return dense.mlp_half(mid)

    def attention_half(x, kw, index):
        mid = sliced.attention_half(x, **kw)
        if attention.writers:
            attention.add(mid, mid_targets[index], masks[index])
            mid_targets[index] = None
        return mid

    def mlp_half(x, index):  # on the stream the refit attention writes
        out = sliced.mlp_half(attention.corrected(x, index))
        if mlp.writers:
            mlp.add(out, dense_acts.hidden[index] @ Q_out.to(out.device, out.dtype), masks[index])
        return out

    try:
        dense_acts.map(advance_dense, kwargs)
        sliced_acts.map(attention_half, kwargs, batches)
        attention.solve(damping)
        sliced_acts.map(mlp_half, batches)
        mlp.solve(damping)
    finally:
        attention.close()
        mlp.close()
    if mlp.writers:
        sliced_acts.map(mlp.corrected, batches)


def _refit_parallel(dense: nn.Module, sliced: nn.Module, dense_acts: Activations, sliced_acts: Activations,
                    kwargs: list[dict], Q_out: torch.Tensor, fit: _BlockFit, damping: float) -> None:
    """Both writers read the layer's input: one pass, attention's output refit first, then the MLP's."""

    def block(x, kw, index):
        out = sliced.parallel_block(x, **kw)
        if fit.writers:
            fit.add(out, dense_acts.hidden[index] @ Q_out.to(out.device, out.dtype), sliced_acts.masks[index])
        return out

    try:
        dense_acts.map(lambda x, kw: dense.parallel_block(x, **kw), kwargs)
        sliced_acts.map(block, kwargs, range(len(kwargs)))
        fit.solve(damping)
    finally:
        fit.close()
    if fit.writers:
        sliced_acts.map(fit.corrected, range(len(kwargs)))


def dense_copy(layer: nn.Module) -> nn.Module:
    """The fused layer before rotation: the refit's reference."""
    return copy.deepcopy(layer)
