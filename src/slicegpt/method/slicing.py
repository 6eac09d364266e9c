"""Calibrate, rotate and slice a fused model, one decoder layer at a time.

Each layer's calibration activations pass through it once: the attention half runs,
its output is the stream the MLP reads, so its PCA fixes the rotation between the two
halves; then the MLP half runs and its output's PCA fixes the basis the next layer
reads. Each later layer sees (and corrects for) the error of the earlier sliced ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from slicegpt.errors import SliceGPTError
from slicegpt.architectures.family import Family, get_module, set_module
from slicegpt.architectures.modeling_sliced import (NormThenMap, NormThenScale, SlicedDecoderLayer, set_width_attrs,
                                                    stream_weight)
from slicegpt.method.activations import Activations
from slicegpt.method.fusion import has_mean_axis
from slicegpt.method.importance import InputSquares, layer_path
from slicegpt.method.pca import CovarianceAccumulator, principal_basis
from slicegpt.method.points import EMBEDDINGS, layer_output, mlp_input
from slicegpt.method.refit import dense_copy, refit_layer
from slicegpt.method.rotation import change_basis, rotate_input, rotate_output, shortcut, to_dense


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer to record the arguments the model passes it."""

    def __init__(self, store: list, last: bool, arg_names: tuple[str, ...]):
        super().__init__()
        self.store, self.last, self.arg_names = store, last, arg_names

    def forward(self, hidden_states, *args, **kwargs):
        if len(args) > len(self.arg_names):
            raise TypeError(f"the model passes a decoder layer {len(args)} positional arguments after "
                            f"hidden_states; the family description names {len(self.arg_names)} (layer_args)")
        self.store.append((hidden_states, {**kwargs, **dict(zip(self.arg_names, args))}))
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, family: Family, batches: list[dict]) -> tuple[Activations, list[list[dict]]]:
    """Inputs to the first layer, and the keyword arguments each layer receives, per batch.

    The model runs its own embedding, position and mask code; the layers are replaced by
    recorders for the duration, so nothing past the embeddings is computed.
    """
    layers = get_module(model, family.layers)
    originals = list(layers)
    stores: list[list] = [[] for _ in originals]
    for index in range(len(originals)):
        layers[index] = _Recorder(stores[index], last=index == len(originals) - 1, arg_names=family.layer_args)
    hidden, masks = [], []
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            except _StopForward:
                pass
            hidden.append(stores[0][-1][0])
            masks.append(batch.get("attention_mask"))
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    layer_kwargs = [[kwargs for _, kwargs in store] for store in stores]
    return Activations(hidden, masks), layer_kwargs


@dataclass
class StreamPoint:
    """One place where a block reads the stream: its name, PCA spectrum and kept width."""

    name: str
    eigenvalues: list[float]
    width: int

    @property
    def variance_kept(self) -> float:
        total = sum(self.eigenvalues)
        return sum(self.eigenvalues[: self.width]) / total if total > 0 else 1.0


@dataclass
class SliceResult:
    points: list[StreamPoint] = field(default_factory=list)
    layer_widths: list[dict] = field(default_factory=list)
    embedding_width: int = 0
    head_in: int = 0
    # Every kept linear's input mean squares per column, in the output's coordinates, and the
    # calibration tokens they are over (method/importance.py).
    importance: dict[str, list[float]] = field(default_factory=dict)
    importance_tokens: int = 0


WidthRule = Callable[[str, torch.Tensor], int]


def _principal(acts: Activations, where: str, normalize: bool = False, also: torch.Tensor | None = None,
               keep_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of the activations; `also` is another covariance to serve equally (trace-normalised);
    `keep_first`: e_0 stays the first basis vector (see pca.principal_basis)."""
    dim = acts.hidden[0].shape[-1]
    acc = CovarianceAccumulator(dim, where=where, device=acts.hidden[0].device, normalize=normalize)
    for x, mask in zip(acts.hidden, acts.masks):
        acc.add(x, mask)
    acc.all_reduce()
    if also is None:
        return principal_basis(acc.sum, keep_first)
    return principal_basis(acc.sum / acc.sum.trace() + also / also.trace(), keep_first)


class Slicer:
    """The per-layer step of per-block rotation (the driver runs it layer by layer);
    `width_rule` picks each point's kept width.

    Every block gets its own output basis (two shortcuts per sequential layer); bases
    shared across blocks are shared_rotation.py's work. With `mean_axis` (a LayerNorm model
    whose head stays tied, see fusion.py) every basis keeps coordinate 0 first, and the
    shortcuts map it to itself. By default the fused model says whether it has one.

    With `keep_layers` (`--widths embedding`) only the embeddings get a PCA basis: every
    later point keeps the dense coordinates (the identity, no PCA), so the first layer's
    attention shortcut is the one map from the embedding basis into the stream, no other
    shortcut is needed, and post-norms keep their scale as a vector.
    """

    def __init__(self, model: nn.Module, family: Family, width_rule: WidthRule, normalize_pca: bool = False,
                 head_covariance: torch.Tensor | None = None, refit: bool = False, mean_axis: bool | None = None,
                 keep_layers: bool = False):
        self.model, self.family, self.width_rule = model, family, width_rule
        self.keep_layers = keep_layers
        self.mean_axis = has_mean_axis(model, family) if mean_axis is None else mean_axis
        # Refit each sliced layer's output projections against the dense stream (refit.py),
        # which the driver carries in `dense_acts` beside the sliced one.
        self.refit = refit
        self.dense_acts: Activations | None = None
        # How to copy a stream (the driver's store may keep it on disk); copies share batches.
        self.copy_stream: Callable[[Activations], Activations] = lambda a: Activations(list(a.hidden), a.masks)
        self._mid_basis: torch.Tensor | None = None
        self.normalize_pca = normalize_pca
        # A tied head reads the embedding basis too: its input covariance shapes that basis.
        self.head_covariance = head_covariance
        self.result = SliceResult()
        self.embedding_basis: torch.Tensor | None = None

    def _basis(self, acts: Activations, name: str, also: torch.Tensor | None = None) -> torch.Tensor:
        eigenvalues, vectors = _principal(acts, where=f"at {name}", normalize=self.normalize_pca, also=also,
                                          keep_first=self.mean_axis)
        width = self.width_rule(name, eigenvalues)
        self.result.points.append(StreamPoint(name, eigenvalues.tolist(), width))
        return vectors[:, :width]

    @torch.no_grad()
    def slice_embeddings(self, acts: Activations) -> torch.Tensor:
        """Rotate the embeddings into the PCA basis of the first layer's input; returns that basis."""
        Q = self._basis(acts, EMBEDDINGS, also=self.head_covariance)
        for path in self.family.embeddings:
            rotate_input(stream_weight(self.model, path), Q)
        acts.map(lambda x: change_basis(x, Q))
        self.result.embedding_width = Q.shape[1]
        self.embedding_basis = Q
        return Q

    @torch.no_grad()
    def slice_layer(self, index: int, layer: SlicedDecoderLayer, acts: Activations, kwargs: list[dict],
                    Q_in: torch.Tensor) -> torch.Tensor:
        """Rotate and slice one fused layer; `acts` become its outputs, in the returned basis."""
        if not isinstance(layer, SlicedDecoderLayer):
            raise TypeError("fuse the model before slicing it")
        if self.keep_layers:  # nothing after the embeddings depends on the calibration text
            return self._keep_layer(index, layer, Q_in, acts.hidden[0].dtype)
        slice_one = self._parallel_layer if layer.parallel else self._sequential_layer
        if not self.refit:
            return slice_one(index, layer, acts, kwargs, Q_in)

        reference, inputs = dense_copy(layer), self.copy_stream(acts)
        Q_out = slice_one(index, layer, acts, kwargs, Q_in)
        refit_layer(reference, layer, self.family.for_layer(index), self.dense_acts, inputs, kwargs, self._mid_basis, Q_out)
        acts.adopt(inputs)  # the refit layer's outputs replace the ones the bases came from
        return Q_out

    @torch.no_grad()
    def head_importance(self, acts: Activations) -> None:
        """The head's input importance: the last layer's outputs (in their kept basis), RMS-normed
        over the dense width as the final norm does."""
        if self.keep_layers:
            return
        dense = self.embedding_basis.shape[0] if self.embedding_basis is not None else acts.hidden[0].shape[-1]
        squares = InputSquares()
        for x, mask in zip(acts.hidden, acts.masks):
            x = x.double()
            squares.mask = mask
            squares.add(self.family.head, x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).div(dense).clamp(min=1e-30)))
        squares.all_reduce()
        self.result.importance.update(squares.means())

    @torch.no_grad()
    def slice_head(self, Q: torch.Tensor) -> None:
        rotate_head(self.model, self.family, Q, self.embedding_basis)
        self.result.head_in = Q.shape[1]

    def _block(self, name: str, family: Family, layer: SlicedDecoderLayer, run: Callable, acts: Activations,
               kwargs: list[dict], Q_in: torch.Tensor, inputs: tuple[str, ...], outputs: tuple[str, ...],
               has_mlp: bool, skip: str, index: int = 0) -> torch.Tensor:
        """One residual block: run it, find the basis of its output, rotate and slice its weights.

        Usually the block's readers are rotated first and it runs at the kept width, with a
        skip path (`skip`, the layer's shortcut attribute) that returns the stream to dense
        coordinates until the output basis is known. MoE blocks instead run with their weights
        still in the dense basis, on the stream brought back to dense coordinates (`x Q_in^T`;
        the sliced directions are zeros), because their experts allocate their output like
        their input. Both equal the rotated block exactly; the first does less work.
        """
        dense_width_only = has_mlp and (family.mlp_width_attrs or family.mlp_keeps_width)
        if dense_width_only:
            acts.map(lambda x, kw: run(to_dense(x, Q_in), **kw), kwargs)
        else:
            for path in inputs:
                rotate_input(stream_weight(layer, path), Q_in)
            setattr(layer, skip, shortcut(Q_in, None, acts.hidden[0].dtype))
            # The block's linears run as they will be kept: their inputs are the importance.
            squares = InputSquares()
            watched = {path: layer_path(self.family, index, path) for path in (*inputs, *outputs)}

            def watched_run(x, kw, mask):
                squares.mask = mask
                return run(x, **kw)

            with squares.watching(layer, watched):
                acts.map(watched_run, kwargs, acts.masks)
            squares.all_reduce()
            self.result.importance.update(squares.means())
            self.result.importance_tokens = max(squares.tokens.values(), default=0)
            setattr(layer, skip, None)
        Q_out = self._basis(acts, name)
        if has_mlp and family.mlp_keeps_width and Q_out.shape[1] != Q_in.shape[1]:
            raise SliceGPTError(f"{family.name} needs the same width before and after its MLP "
                                f"(got {Q_in.shape[1]} and {Q_out.shape[1]} at {name})")
        if dense_width_only:
            for path in inputs:
                rotate_input(stream_weight(layer, path), Q_in)
        for path in outputs:
            rotate_output(stream_weight(layer, path), Q_out)
        if has_mlp:
            set_width_attrs(layer, family.mlp_width_attrs, Q_in.shape[1])
        acts.map(lambda x: change_basis(x, Q_out))
        return Q_out

    def _sequential_layer(self, index: int, layer: SlicedDecoderLayer, acts: Activations,
                          kwargs: list[dict], Q_in: torch.Tensor) -> torch.Tensor:
        family, dtype = self.family.for_layer(index), acts.hidden[0].dtype
        layer.attn_shortcut = layer.mlp_shortcut = None
        Q_mid = self._block(mlp_input(index), family, layer, layer.attention_half, acts, kwargs, Q_in,
                            family.attn_inputs, family.writers("attn"), has_mlp=False, skip="attn_shortcut",
                            index=index)
        layer.attn_shortcut = shortcut(Q_in, Q_mid, dtype)
        no_kwargs = [{} for _ in kwargs]
        Q_out = self._block(layer_output(index), family, layer, layer.mlp_half, acts, no_kwargs, Q_mid,
                            family.mlp_inputs, family.writers("mlp"), has_mlp=True, skip="mlp_shortcut",
                            index=index)
        layer.mlp_shortcut = shortcut(Q_mid, Q_out, dtype)
        self._mid_basis = Q_mid
        self.result.layer_widths.append(layer_record(layer, Q_in, Q_out, Q_mid))
        return Q_out

    def _parallel_layer(self, index: int, layer: SlicedDecoderLayer, acts: Activations,
                        kwargs: list[dict], Q_in: torch.Tensor) -> torch.Tensor:
        family, dtype = self.family.for_layer(index), acts.hidden[0].dtype
        layer.attn_shortcut = None
        Q_out = self._block(layer_output(index), family, layer, layer.parallel_block, acts, kwargs, Q_in,
                            (*family.attn_inputs, *family.mlp_inputs), (*family.writers("attn"), *family.writers("mlp")),
                            has_mlp=True, skip="attn_shortcut", index=index)
        layer.attn_shortcut = shortcut(Q_in, Q_out, dtype)
        self._mid_basis = None
        self.result.layer_widths.append(layer_record(layer, Q_in, Q_out))
        return Q_out

    def _keep_layer(self, index: int, layer: SlicedDecoderLayer, Q_in: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A layer under `keep_layers`: its outputs stay in dense coordinates (the identity basis),
        so it needs no forward and no PCA; only the first layer's branch inputs read the
        embedding basis, and its attention shortcut maps that into dense coordinates."""
        family, dim = self.family.for_layer(index), Q_in.shape[0]
        names = [layer_output(index)] if layer.parallel else [mlp_input(index), layer_output(index)]
        self.result.points += [StreamPoint(name, [], dim) for name in names]
        identity = torch.eye(dim, dtype=torch.float64)
        if index == 0:  # later layers read the identity (a resumed run holds a copy of it)
            readers = (*family.attn_inputs, *family.mlp_inputs) if layer.parallel else family.attn_inputs
            for path in readers:
                rotate_input(stream_weight(layer, path), Q_in)
            if layer.parallel:
                set_width_attrs(layer, family.mlp_width_attrs, Q_in.shape[1])
        layer.attn_shortcut = shortcut(Q_in, identity, dtype) if index == 0 else None
        layer.mlp_shortcut = None
        for path in filter(None, (family.attn_post_norm, family.mlp_post_norm)):
            set_module(layer, path, scale_only(get_module(layer, path), path))
        self.result.layer_widths.append(layer_record(layer, Q_in, identity, None if layer.parallel else identity))
        return identity


def scale_only(post_norm: NormThenMap, path: str) -> NormThenScale:
    """A post-norm writing into dense coordinates: its map is diagonal, so keep the diagonal."""
    weight = post_norm.map.weight
    if post_norm.map.bias is not None or post_norm.norm.skip_first or \
            not torch.equal(weight, torch.diag(torch.diagonal(weight))):
        raise SliceGPTError(f"the post-norm '{path}' does not reduce to a scale in dense coordinates")
    scaled = NormThenScale(post_norm.norm.dense_width, post_norm.norm.eps, device=weight.device, dtype=weight.dtype)
    scaled.weight.data.copy_(torch.diagonal(weight))
    return scaled

def layer_record(layer: SlicedDecoderLayer, Q_in: torch.Tensor, Q_out: torch.Tensor,
                 Q_mid: torch.Tensor | None = None) -> dict:
    """A layer's widths, and which shortcuts it has where one is not on every path."""
    record = {"in": Q_in.shape[1]}
    if Q_mid is not None:
        record["mid"] = Q_mid.shape[1]
    record["out"] = Q_out.shape[1]
    missing = [name for name in ("attn", "mlp") if getattr(layer, f"{name}_shortcut") is None
               and not (name == "mlp" and layer.parallel)]
    if missing:
        record["no_shortcut"] = missing
    scaled = [part for part in ("attn", "mlp") if isinstance(getattr(layer, layer.names[f"{part}_post_norm"] or "",
                                                                     None), NormThenScale)]
    if scaled:
        record["post_norm_scales"] = scaled
    return record


@torch.no_grad()
def rotate_head(model: nn.Module, family: Family, Q_last: torch.Tensor, Q_embedding: torch.Tensor) -> None:
    """The head reads the last basis; a tied head reads through the final map instead."""
    head = get_module(model, family.head)
    final_norm = get_module(model, family.final_norm)
    if not isinstance(final_norm, NormThenMap):
        rotate_input(stream_weight(model, family.head), Q_last)
        return
    final_map = stream_weight(final_norm, "map")
    rotate_input(final_map, Q_last)
    rotate_output(final_map, Q_embedding)
    embedding = get_module(model, family.embeddings[0])
    head.weight = embedding.weight  # rotating the embedding replaced its Parameter: tie again
    head.in_features = embedding.weight.shape[1]


def constant_width(width: int) -> WidthRule:
    return lambda name, eigenvalues: min(width, eigenvalues.shape[0])


def slicing_metadata(model: nn.Module, family: Family, result: SliceResult, eps: float,
                     added_biases: list[str] = ()) -> dict:
    """What the sliced modeling code needs to rebuild the model's shape (goes into config.json)."""
    final_map = getattr(get_module(model, family.final_norm), "map", None)
    return {
        "format_version": 2,
        "base_architecture": type(model).__name__,
        "family": family.to_dict(),
        "dense_hidden_size": model.config.hidden_size,
        "norm_eps": eps,
        "embedding_width": result.embedding_width,
        "layers": result.layer_widths,
        "head_in": result.head_in,
        "tied_head": final_map is not None,
        "final_map_bias": final_map is not None and final_map.bias is not None,
        # Coordinate 0 is the mean direction, which every norm ignores (tied LayerNorm models).
        **({"mean_axis": True} if has_mean_axis(model, family) else {}),
        # Linears that had no bias until fusion folded a LayerNorm shift into them.
        "added_biases": list(added_biases),
    }
