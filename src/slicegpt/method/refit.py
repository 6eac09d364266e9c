"""Least-squares refit of each sliced layer's output projections (`--refit`).

Slicing drops the stream's least-used directions, and each layer then reads a slightly
wrong input; the errors add up with depth. After a layer is rotated and sliced, the
linear maps that write its blocks' outputs (attention's output projection, the MLP's down
projection) are refit so that the sliced layer, fed the sliced model's own stream, comes
as close as it can, in least squares over the calibration tokens, to what the dense layer
writes on the dense stream (in the kept coordinates). A ridge term pulls the weights
towards the ones they replace, so directions the calibration text hardly visits keep
their rotated values.

Each refit needs the inputs of the projection (the Z below) and a target: the dense
stream after the block, minus everything of the sliced block's output that does not come
from the projection. Hooks read both while the layer runs as it is, so this works for
any layer the families describe; a sequential (non-parallel) layer runs three times:
once to refit the attention output, once the MLP's, once to move the stream on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slicegpt.architectures.family import Family, get_module
from slicegpt.architectures.modeling_sliced import first_output
from slicegpt.method.pca import _comm_device, _distributed
from slicegpt.method.activations import Activations

# Ridge weight, relative to the mean of diag(Z^T Z): small enough that well-visited
# directions follow the data, large enough to keep the solve well conditioned.
DAMPING = 1e-2


class LeastSquares:
    """Sums Z^T Z and Z^T R over the tokens it is shown; solves for W in Z W^T ~ R."""

    CHUNK = 4096

    def __init__(self, inputs: int, outputs: int, device):
        self.gram = torch.zeros(inputs, inputs, dtype=torch.float64, device=device)
        self.cross = torch.zeros(inputs, outputs, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, Z: torch.Tensor, R: torch.Tensor, mask: torch.Tensor | None) -> None:
        Z, R = Z.reshape(-1, Z.shape[-1]), R.reshape(-1, R.shape[-1])
        if mask is not None:
            keep = mask.reshape(-1).to(torch.bool)
            Z, R = Z[keep], R[keep]
        # Products in float32 (float64 where the activations are), summed in float64, as pca does.
        compute = torch.float64 if Z.dtype == torch.float64 else torch.float32
        for z, r in zip(Z.split(self.CHUNK), R.split(self.CHUNK)):
            z, r = z.to(self.gram.device, compute), r.to(self.gram.device, compute)
            self.gram += z.T @ z
            self.cross += z.T @ r

    def all_reduce(self) -> None:
        if not _distributed():
            return
        import torch.distributed as dist

        for name in ("gram", "cross"):
            total = getattr(self, name).to(_comm_device(self.gram.device))
            dist.all_reduce(total)
            setattr(self, name, total.to(self.gram.device))

    def solve(self, previous: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
        """argmin_W |Z W^T - R|^2 + lam |W - previous|^2, lam = damping x mean(diag(Z^T Z))."""
        previous = previous.to(self.gram.device, torch.float64)
        lam = damping * self.gram.diagonal().mean().clamp(min=1e-12)
        system = self.gram + lam * torch.eye(self.gram.shape[0], dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(system, self.cross + lam * previous.T).T


def refittable(layer: nn.Module, paths: tuple[str, ...]) -> nn.Linear | None:
    """The block's one output projection, where it is a plain linear (not MoE experts)."""
    if len(paths) != 1:
        return None
    owner, _, name = paths[0].rpartition(".")
    module = getattr(get_module(layer, owner) if owner else layer, name)
    return module if isinstance(module, nn.Linear) else None


class _Tap:
    """Records a module's input (pre-hook) or output while the layer runs."""

    def __init__(self, module: nn.Module, output: bool = False):
        self.value = None
        if output:
            self.handle = module.register_forward_hook(lambda m, args, out: self._keep(first_output(out)))
        else:
            self.handle = module.register_forward_pre_hook(lambda m, args: self._keep(args[0]))

    def _keep(self, value):
        self.value = value

    def remove(self):
        self.handle.remove()


@torch.no_grad()
def _refit_projection(projection: nn.Linear, run, targets: list[torch.Tensor], masks: list, where: nn.Module,
                      where_output: bool, damping: float) -> None:
    """Refit `projection` so the stream at `where` (a module's input, or its output) comes
    closest to `targets`, batch by batch, while `run(index)` runs the layer on batch `index`."""
    solver = LeastSquares(projection.weight.shape[1], projection.weight.shape[0], projection.weight.device)
    inputs, stream = _Tap(projection), _Tap(where, output=where_output)
    try:
        for index, target in enumerate(targets):
            run(index)
            Z, after = inputs.value, stream.value
            written = Z @ projection.weight.T  # the projection's share of the stream (its bias stays)
            solver.add(Z, target - (after - written), masks[index])
    finally:
        inputs.remove()
        stream.remove()
    solver.all_reduce()
    weight = solver.solve(projection.weight, damping)
    projection.weight.data = weight.to(projection.weight.dtype).contiguous()


@torch.no_grad()
def refit_layer(dense: nn.Module, sliced: nn.Module, family: Family, dense_acts: Activations,
                sliced_acts: Activations, kwargs: list[dict], Q_mid: torch.Tensor | None, Q_out: torch.Tensor,
                damping: float = DAMPING) -> None:
    """Refit `sliced` (a layer rotated and sliced) against `dense` (the same layer fused but not
    rotated); then move both streams past the layer. Q_mid and Q_out are the kept bases after
    the attention block (None for a parallel layer) and after the layer.

    A sequential layer's attention output is fit to the stream between its blocks; a parallel
    layer's, like the MLP's, to the stream after the layer.
    """
    sequential = not sliced.parallel and family.mlp_norm is not None
    attention, mlp = refittable(sliced, family.writers("attn")), refittable(sliced, family.writers("mlp"))
    mid_targets, out_targets = [], []  # the dense stream, in the kept coordinates
    mid_tap = _Tap(get_module(dense, family.mlp_norm)) if sequential and attention is not None else None

    def advance(x, kw):
        y = first_output(dense(x, **kw))
        if mid_tap is not None:
            mid_targets.append(mid_tap.value @ Q_mid.to(y.device, y.dtype))
        out_targets.append(y @ Q_out.to(y.device, y.dtype))
        return y

    try:
        dense_acts.map(advance, kwargs)
    finally:
        if mid_tap is not None:
            mid_tap.remove()

    def run_sliced(index: int) -> torch.Tensor:
        return first_output(sliced(sliced_acts.hidden[index], **kwargs[index]))

    if attention is not None and sequential:
        _refit_projection(attention, run_sliced, mid_targets, sliced_acts.masks, get_module(sliced, family.mlp_norm),
                          False, damping)
    elif attention is not None:
        _refit_projection(attention, run_sliced, out_targets, sliced_acts.masks, sliced, True, damping)
    mid_targets.clear()
    if mlp is not None:
        _refit_projection(mlp, run_sliced, out_targets, sliced_acts.masks, sliced, True, damping)
    out_targets.clear()
    sliced_acts.map(lambda x, kw: first_output(sliced(x, **kw)), kwargs)


def dense_copy(layer: nn.Module) -> nn.Module:
    """The fused layer before rotation: the refit's reference."""
    return copy.deepcopy(layer)
