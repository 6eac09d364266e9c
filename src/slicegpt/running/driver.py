"""Calibrate, rotate and slice a model layer by layer: one driver per layout, over a layer store.

- Per-block bases (`--rotations block`): each block's output basis is the PCA of its own
  calibration outputs, found as the layer runs on the sliced stream (`slicing.Slicer`
  does the per-layer step).
- Shared bases (`layer`, `group:K`, `model`): a first pass over the fused dense layers
  collects every stream point's covariance, and each group's basis is fixed as soon as
  its last point is in; a second pass rotates every layer into its bases (where the
  readers' importance is measured there, on the dense stream, each layer also runs dense:
  the refit's reference, or the layer itself before it is rotated; method/importance.py).

Either can refit each sliced layer's output projections (`--refit`, refit.py), carrying
the dense stream beside the sliced one. The store (layer_store.py) decides where weights
and activations live; the driver checkpoints through it after every layer, and resumes
from what the store recorded. Per-point widths from the spectra (`--widths variance`)
come from a survey of an eighth of the calibration batches, before any layer is rotated.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from tqdm.auto import tqdm

from slicegpt.architectures.modeling_sliced import first_output, stream_weight
from slicegpt.config import SliceConfig
from slicegpt.method.importance import (InputSquares, ReaderSquares, holds_reader_covariances, kept_diagonal,
                                        readers_of)
from slicegpt.method.pca import CovarianceAccumulator
from slicegpt.method.refit import dense_copy, refit_layer
from slicegpt.method.rotation import change_basis, rotate_input
from slicegpt.method.points import EMBEDDINGS, HEAD_INPUT, layer_input, layer_output, mlp_input, stream_points
from slicegpt.method.shared_rotation import GroupBases, rotate_layer
from slicegpt.method.slicing import SliceResult, Slicer, WidthRule, constant_width, rotate_head, slicing_metadata
from slicegpt.running.covariances import collect_covariances
from slicegpt.running.distributed import leading_share
from slicegpt.running.resume import result_from_dict, result_to_dict
from slicegpt.sizing.budget import parameter_budget, sizing_facts, width_for_budget
from slicegpt.sizing.schedule import spectra_of, variance_schedule

# The share of the calibration batches (at least one) a survey reads: 8 of protocol P's 64
# sequences, 16k tokens, is plenty for a 576-wide covariance; the survey costs that share of
# a dense forward.
SURVEY_SHARE = 0.125
SLICED, DENSE = "acts", "dense"  # the activation streams (and their checkpoint file prefixes)


def slice_layers(store, config: SliceConfig, batches: list[dict], width_rule: WidthRule | None = None) -> SliceResult:
    """Fuse, rotate and slice the store's model; `config` has its layout resolved already.
    `width_rule` overrides the widths the config asks for (an experiment's hook)."""
    # Sizes are counted on the model as it was before fusion.
    budget = Budget(parameter_budget(store.model, store.family, config),
                    sizing_facts(store.model, store.family, config), None)
    if config.widths != "variance" and width_rule is None:
        budget.uniform = _uniform_width(store, config, budget.target)
    store.open()
    state = store.resume()
    run = _per_block if config.rotations == "block" else _shared
    result = run(store, config, batches, budget, state, width_rule)
    model = store.model
    model.config.slicing = slicing_metadata(model, store.family, result, store.eps, store.added_biases)
    model.config.slicing["config"] = config.to_dict()
    return result


def _survey(store, config: SliceConfig, batches: list[dict]) -> dict[str, CovarianceAccumulator] | None:
    """Covariances of the fused dense model where the config needs them before rotating: every
    point's for widths from the spectra, the head input's for a tied head's joint basis."""
    joint_head = store.tied and config.tied_head_basis == "joint" and config.rotations == "block"
    if config.widths != "variance" and not joint_head:
        return None
    subset = leading_share(batches, SURVEY_SHARE)
    acts, kwargs = store.capture(subset)
    names = stream_points(store.family, store.layer_count) if config.widths == "variance" else []
    found: dict[str, CovarianceAccumulator] = {}
    collect_covariances(store, acts, kwargs, names, found.__setitem__, normalize=config.pca == "normalized",
                        head=joint_head, description="Surveying the dense model")
    _drop(acts)
    return found


@dataclass
class Budget:
    target: int | None  # real parameters to meet, where the config asks for a size
    facts: dict  # sizing.budget.sizing_facts of the model before fusion
    uniform: int | None  # the one width, where widths are uniform


def _uniform_width(store, config: SliceConfig, target: int | None) -> int:
    if target is None:
        return config.kept_width(store.dense)
    return width_for_budget(store.model, store.family, config, target)


def _widths(store, config: SliceConfig, budget: Budget, batches: list[dict],
            override: WidthRule | None) -> tuple[dict[str, int] | None, dict | None]:
    """Per-point widths where they come from spectra (else None), and the survey's covariances."""
    covariances = _survey(store, config, batches)
    if config.widths != "variance" or override is not None:
        return None, covariances
    spectra = spectra_of(covariances, store.mean_axis)
    return variance_schedule(store.model, store.family, config, spectra, budget.target, budget.facts), covariances


def _rule(budget: Budget, widths: dict[str, int] | None, override: WidthRule | None) -> WidthRule:
    if override is not None:
        return override
    if widths is not None:
        return lambda name, eigenvalues: widths[name]
    return constant_width(budget.uniform)


def _layers(store, start: int):
    return tqdm(range(start, store.layer_count), desc="Slicing layers", unit="layer", disable=not store.progress,
                initial=start, total=store.layer_count)


def _drop(acts) -> None:
    if hasattr(acts, "discard"):  # spilled to disk
        acts.discard()
    else:
        acts.hidden.clear()


def _per_block(store, config: SliceConfig, batches, budget, state, override) -> SliceResult:
    acts, kwargs = store.capture(batches, keep_hidden=state is None)
    covariances = None
    if state is None:
        widths, covariances = _widths(store, config, budget, batches, override)
    else:
        widths = state["widths"]
    head = covariances.get(HEAD_INPUT) if covariances and config.tied_head_basis == "joint" else None
    slicer = Slicer(store.model, store.family, _rule(budget, widths, override),
                    normalize_pca=config.pca == "normalized", head_covariance=None if head is None else head.sum,
                    refit=config.refit, mean_axis=store.mean_axis, keep_layers=config.widths == "embedding")
    slicer.copy_stream = lambda stream: store.copy(stream, "inputs")
    if state is None:
        if config.refit:
            slicer.dense_acts = store.copy(acts, DENSE)
        Q = slicer.slice_embeddings(acts)
        store.close_embeddings()
        start, embedding = 0, store.keep_basis(slicer.embedding_basis, EMBEDDINGS)
    else:
        start, embedding = state["next_layer"], state["bases"][EMBEDDINGS]
        Q = store.basis(state["bases"]["current"])
        slicer.embedding_basis = store.basis(embedding)
        slicer.result = result_from_dict(state["result"])
        streams = store.restore(state, acts.masks)
        acts, slicer.dense_acts = streams[SLICED], streams.get(DENSE)
        store.close_embeddings(write=False)

    def checkpoint(next_layer: int) -> None:
        streams = {SLICED: acts, **({DENSE: slicer.dense_acts} if config.refit else {})}
        store.checkpoint(next_layer, lambda: {
            "bases": {"current": store.keep_basis(Q, f"layer{next_layer:05d}"), EMBEDDINGS: embedding},
            "widths": widths, "result": result_to_dict(slicer.result)}, streams)

    if state is None:
        checkpoint(0)
    for index in _layers(store, start):
        layer = store.layer(index)
        Q = slicer.slice_layer(index, layer, acts, kwargs[index], Q)
        store.close_layer(index, layer)
        kwargs[index] = None
        checkpoint(index + 1)
    slicer.head_importance(acts)
    store.close_head(lambda: slicer.slice_head(Q))
    for stream in (acts, slicer.dense_acts):
        if stream is not None:
            _drop(stream)
    return slicer.result


def _holds_readers(store, config: SliceConfig) -> bool:
    """Whether the covariance pass holds the readers' covariances (else the rotation pass
    measures their importance: method/importance.py)."""
    return holds_reader_covariances(store.dense, len(stream_points(store.family, store.layer_count)),
                                    config.group_size)


def _shared_bases(store, config: SliceConfig, acts, kwargs, rule: WidthRule) -> tuple[dict[str, str], list, dict, int]:
    """The first pass: every point's covariance over all batches, one basis per group, kept
    (by the store) as soon as the group is complete. Returns each point's basis handle, the
    points' records, and the importance of every kept linear's inputs with its token count
    (the readers' from the normed covariances in their group's basis, held until the group is
    complete where they fit; the projections' from the pass's hooks)."""
    joint = store.tied and config.tied_head_basis == "joint"
    names = stream_points(store.family, store.layer_count)
    grouping = GroupBases(names, store.layer_count, config.group_size, rule, joint, mean_axis=store.mean_axis)
    handles: dict[str, str] = {}
    squares, pending, importance = InputSquares(), {}, {}
    tokens, hold = 0, _holds_readers(store, config)

    def count(name: str, found: CovarianceAccumulator) -> None:
        nonlocal tokens
        if hold and name in grouping.names:
            pending[name] = (found.normalized.float().cpu(), found.tokens)
        done = grouping.add(name, found.sum)
        if done:
            group, basis = done
            handles.update(dict.fromkeys(group, store.keep_basis(basis, f"group{grouping.group_of[group[0]]:05d}")))
            for member in group:
                if member not in pending:
                    continue
                normed, tokens = pending.pop(member)
                for reader in readers_of(member, store.family, store.layer_count, store.family.parallel):
                    importance[reader] = kept_diagonal(normed, tokens, basis)

    collect_covariances(store, acts, kwargs, names, count, normalize=config.pca == "normalized", head=joint,
                        importance=squares)
    squares.all_reduce()
    importance.update(squares.means())
    store.barrier()  # every group's basis is kept before any rank reads one
    return handles, grouping.stream_points(), importance, tokens or max(squares.tokens.values(), default=0)


def _shared(store, config: SliceConfig, batches, budget, state, override) -> SliceResult:
    family, refit = store.family, config.refit
    streams: dict = {}
    refit_batches = leading_share(batches, config.refit_share) if refit and config.refit_share < 1 else batches
    # The bases may come from the leading share of the batches (--basis-share).
    basis_batches = leading_share(batches, config.basis_share) if config.basis_share < 1 else batches
    # The rotation pass carries the dense stream for the refit, and for the readers' importance
    # where the first pass could not hold their covariances.
    measure_readers = not _holds_readers(store, config)
    dense_batches = refit_batches if refit else basis_batches
    if state is None:
        widths, _ = _widths(store, config, budget, batches, override)
        acts, kwargs = store.capture(basis_batches)
        handles, points, importance, tokens = _shared_bases(store, config, acts, kwargs,
                                                            _rule(budget, widths, override))
        _drop(acts)  # the first pass moved them past the last layer
        result = SliceResult(points=points, importance=importance, importance_tokens=tokens)
        Q_embedding = store.basis(handles[EMBEDDINGS])
        if refit or measure_readers:  # the first layer's inputs again: dense (and, to refit, in the embedding basis)
            dense, kwargs = store.capture(dense_batches)
            streams = {DENSE: dense}
        if refit:
            streams[SLICED] = store.copy(dense, SLICED, lambda x: change_basis(x, Q_embedding))
        for path in family.embeddings:
            rotate_input(stream_weight(store.model, path), Q_embedding)
        result.embedding_width = Q_embedding.shape[1]
        store.close_embeddings()
        start = 0
    else:
        start, handles, widths = state["next_layer"], state["bases"], state["widths"]
        result = result_from_dict(state["result"])
        acts, kwargs = store.capture(dense_batches, keep_hidden=False)
        streams = store.restore(state, acts.masks)
        store.close_embeddings(write=False)

    def checkpoint(next_layer: int) -> None:
        store.checkpoint(next_layer, lambda: {"bases": handles, "widths": widths, "result": result_to_dict(result)},
                         streams)

    loaded: dict[str, object] = {}  # handle -> basis: the points of one group share one

    def bases_for(names) -> dict:
        wanted = {name: handles[name] for name in names if name in handles}
        for handle in set(loaded) - set(wanted.values()):
            del loaded[handle]
        for handle in wanted.values():
            if handle not in loaded:
                loaded[handle] = store.basis(handle)
        return {name: loaded[handle] for name, handle in wanted.items()}

    readers = ReaderSquares(family, store.layer_count, streams[DENSE].masks) if measure_readers else None

    def watching(dense_layer, index: int, bases: dict):
        return nullcontext() if readers is None else readers.watching(dense_layer, index, bases, result.importance)

    if state is None:
        checkpoint(0)
    for index in _layers(store, start):
        layer = store.layer(index)
        mid, out = mlp_input(index), layer_output(index)
        bases = bases_for([layer_input(index), mid, out])
        reference = dense_copy(layer) if refit else None
        if readers is not None and not refit:  # a dense forward for the readers' importance alone
            with watching(layer, index, bases):
                streams[DENSE].map(lambda x, kw: first_output(layer(x, **kw)), kwargs[index])
        result.layer_widths.append(rotate_layer(layer, family, index, bases))
        if refit:
            with watching(reference, index, bases):
                refit_layer(reference, layer, family.for_layer(index), streams[DENSE], streams[SLICED],
                            kwargs[index], bases.get(mid), bases[out])
            del reference
        kwargs[index] = None
        store.close_layer(index, layer)
        checkpoint(index + 1)
    last = layer_output(store.layer_count - 1)
    bases = bases_for([last, EMBEDDINGS])
    if readers is not None:
        readers.head(streams[DENSE], bases[last], result.importance)
    store.close_head(lambda: rotate_head(store.model, family, bases[last], bases[EMBEDDINGS]))
    result.head_in = bases[last].shape[1]
    for stream in streams.values():
        _drop(stream)
    return result
