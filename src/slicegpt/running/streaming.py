"""Streaming mode: slice a model larger than memory, one decoder layer at a time.

The model is built without weights (meta device). The embeddings are read from the
safetensors shards and the calibration text runs through them; then each decoder layer
is read (only its own tensors), fused, rotated and sliced, written to its own output
shard and freed. Two layouts, two passes:

- per-block bases (`--rotations block`): each layer is calibrated as it is read, by the
  same `Slicer` step the in-memory run uses, on activations that spill to a file on disk
  when they do not fit in memory (`spill.DiskActivations`);
- shared bases (`layer`, `group:K`, `model`): a first pass collects every stream point's
  covariance from a fused copy of each layer, saving each group's basis once the group is
  complete; a second pass rotates each layer with those bases and needs no activations.

Peak memory is one layer plus one layer's calibration activations. The result equals the
in-memory run's, tensor for tensor. Output is built in `.<name>.partial` beside the output
directory and renamed into place at the end. After each layer the run checkpoints into its
`resume/` folder (see `resume.py`), so the same command resumes after a crash or kill -9.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.architectures.families import family_for, get_module
from slicegpt.architectures.modeling_sliced import first_output, stream_weight
from slicegpt.config import SliceConfig
from slicegpt.errors import SliceGPTError
from slicegpt.io.checkpoint import AUTO_MAP, check_output_dir, write_companion_files
from slicegpt.io.converted import ConvertedCheckpoint
from slicegpt.io.permissions import ordinary_permissions
from slicegpt.io.shards import SafetensorsCheckpoint, shard_name, write_index, write_shard
from slicegpt.method.activations import Activations
from slicegpt.method.fusion import (final_map, fuse_embeddings, fuse_head, fuse_layer, keep_head_tied, norm_eps,
                                    uses_mean_axis)
from slicegpt.method.pca import CovarianceAccumulator
from slicegpt.method.rotation import rotate_input
from slicegpt.method.shared_rotation import GroupBases, HEAD_INPUT, basis_before, rotate_layer, stream_points
from slicegpt.method.slicing import SliceResult, capture_layer_inputs, rotate_head, slicing_metadata
from slicegpt.running.distributed import DistContext, leading_share
from slicegpt.running.in_memory import SURVEY_SHARE, build_slicer, width_rule_for
from slicegpt.running.resources import available_memory, check_disk, dtype_bytes, gib, release_memory
from slicegpt.running.resume import WorkDir, result_from_dict, result_to_dict
from slicegpt.running.spill import DiskActivations
from slicegpt.sizing.budget import parameter_budget
from slicegpt.sizing.layout import resolve_layout

# Test hook: SIGKILL this process right after the checkpoint that follows layer N
# (on rank SLICEGPT_TEST_KILL_RANK only, when that is set). Nothing else reads these.
KILL_AFTER_LAYER_ENV = "SLICEGPT_TEST_KILL_AFTER_LAYER"
KILL_RANK_ENV = "SLICEGPT_TEST_KILL_RANK"


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def empty_model(model_dir: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model's module tree with every parameter on the meta device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # transformers ties at load time, which a bare skeleton never has
    return model.eval()


def check_streamable(config: SliceConfig) -> None:
    """Refuse what streaming cannot do: the refit (it needs the dense and sliced streams side by side)
    and widths from spectra (streaming decides widths before it reads any layer)."""
    if config.refit:
        raise SliceGPTError("--refit needs the dense and the sliced calibration streams side by side through "
                            "every layer, which streaming mode does not keep yet (use --no-streaming)")
    if config.widths != "uniform":
        raise SliceGPTError(f"--widths {config.widths} needs every layer's spectrum before slicing; streaming "
                            "supports uniform widths (or use --no-streaming)")


class StreamingRun:
    """One streaming slicing run: `plan` checks resources, `run` slices, `finish` publishes."""

    def __init__(self, model_dir: str | Path, out: str | Path, config: SliceConfig, *,
                 dtype: torch.dtype = torch.float32, ctx: DistContext | None = None, spill: str = "auto",
                 fresh: bool = False, overwrite: bool = False, progress: bool = True):
        self.model_dir, self.out, self.config = Path(model_dir), Path(out), config
        self.dtype, self.ctx = dtype, ctx or DistContext()
        self.device = torch.device(self.ctx.device)
        self.spill, self.fresh, self.overwrite, self.progress = spill, fresh, overwrite, progress
        check_output_dir(self.out, overwrite)
        self.checkpoint = SafetensorsCheckpoint(self.model_dir)
        self.model = empty_model(self.model_dir, dtype)
        self.tensors = ConvertedCheckpoint(self.checkpoint, self.model)  # by the model's own names
        self.family = family_for(self.model)
        self.config = config = resolve_layout(self.model, self.family, config)
        check_streamable(config)
        text_config = self.model.config.get_text_config()
        # Tied in the source checkpoint (the head is read from the embedding's tensor) ...
        self.source_tied = bool(getattr(text_config, "tie_word_embeddings", False))
        # ... and in the output (a map after the final norm; see fusion.NormThenMap).
        self.tied = keep_head_tied(self.model, self.family, config.tied_head)
        self.mean_axis = uses_mean_axis(self.family, self.tied)  # LayerNorm and tied: see fusion.py
        self.width_rule = self._width_rule()
        self.dense = self.model.config.hidden_size
        self.layer_count = len(get_module(self.model, self.family.layers))
        self.directory = partial_dir(self.out)
        self.work = WorkDir(self.directory / "resume", self.ctx.rank)
        self.shard_count = self.layer_count + 2  # embeddings, each layer, head
        self.spilling = False

    def _width_rule(self):
        """Decided on the weightless model, before any layer is read (as the in-memory run does)."""

        return width_rule_for(self.model, self.family, self.config, None,
                              parameter_budget(self.model, self.family, self.config))

    # -- settings and resources -------------------------------------------------------------

    def settings(self) -> dict:
        """What must be equal for a checkpoint to be resumed."""
        files = {p.name: p.stat().st_size for p in self.checkpoint.files()}
        return {**self.config.to_dict(), "model": str(self.model_dir.resolve()), "model_files": files,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type,
                "world_size": self.ctx.world_size}

    def plan(self, batches: list[dict]) -> dict:
        """Decide whether activations spill, and check disk space; before any work."""
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        acts = tokens * self.dense * dtype_bytes(self.dtype)
        shapes = self.checkpoint.shapes()
        largest = max(math.prod(s) for s in shapes.values())
        reserve = 3 * largest * 8 + self._layer_bytes(shapes) + 2**30
        free = available_memory(str(self.device))
        if self.spill == "auto":
            self.spilling = 2 * acts > free - reserve
        else:
            self.spilling = self.spill == "always"
        width = self.config.kept_width(self.dense)
        dense_params = sum(math.prod(s) for s in shapes.values())
        vocab = self.model.get_input_embeddings().num_embeddings
        output = (dense_params + 2 * self.layer_count * width**2 + (vocab * self.dense if self.source_tied else 0))
        output *= dtype_bytes(self.dtype)
        # Activations: the checkpoint copy beside the live one, or (spilled) two live files and a pinned one.
        work = (3 if self.spilling else 2) * acts * self.ctx.world_size
        already = sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file()) \
            if self.directory.exists() and not self.fresh else 0
        if self.ctx.is_main:
            check_disk(self.out.parent, {"output": output, "activations and checkpoints": work}, already)
        return {"activations_bytes": acts, "spill": self.spilling, "output_bytes_estimate": output,
                "work_bytes_estimate": work, "available_memory": free}

    def _layer_bytes(self, shapes: dict) -> int:
        prefix = f"{self.family.layers}.0."
        count = sum(math.prod(s) for name, s in shapes.items() if name.startswith(prefix))
        return count * dtype_bytes(self.dtype)

    # -- reading weights ----------------------------------------------------------------------

    def _materialize(self, path: str, skip: tuple[str, ...] = (), alias: dict[str, str] | None = None) -> None:
        """Read the meta parameters (and stored buffers) of module `path` from the checkpoint,
        converted as `from_pretrained` converts them; `alias` reads a parameter from another's tensor."""
        from accelerate.utils import set_module_tensor_to_device

        module = get_module(self.model, path) if path else self.model
        alias = alias or {}
        names = {}
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            full = f"{path}.{name}" if path else name
            if any(full == s or full.startswith(s + ".") for s in skip):
                continue
            source = alias.get(full, full)
            if tensor.device.type == "meta" or source in self.tensors:  # a parameter, or a stored buffer
                names[name] = source
        tensors = self.tensors.read(sorted(set(names.values())))
        for name, source in names.items():
            set_module_tensor_to_device(module, name, self.device, value=tensors[source], dtype=self.dtype,
                                        clear_cache=False)

    # -- the run --------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, batches: list[dict]) -> SliceResult:
        """Slice layer by layer, checkpointing after each; resumes a matching interrupted run."""
        ctx, family, model = self.ctx, self.family, self.model
        settings = self.settings()
        if self.fresh and ctx.is_main and self.directory.exists():
            shutil.rmtree(self.directory)
        ctx.barrier()
        state = self.work.load(settings)
        if ctx.is_main:
            self.work.path.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]

        self._materialize("", skip=(family.layers, family.head))
        fuse_embeddings(model, family, self.tied)
        eps = norm_eps(model, family)
        acts, layer_kwargs = self._capture(batches, keep_hidden=state is None)
        if self.config.rotations == "block":
            result = self._run_block(batches, state, settings, acts, layer_kwargs, eps)
        else:
            result = self._run_shared(state, settings, acts, layer_kwargs, eps)
        if isinstance(acts, DiskActivations):
            acts.discard()
        ctx.barrier()
        model.config.slicing = slicing_metadata(model, family, result, eps, self.added_biases)
        model.config.slicing["config"] = self.config.to_dict()
        return result

    def _run_block(self, batches, state, settings, acts, layer_kwargs, eps) -> SliceResult:
        """Two bases per layer, each found on the activations as they leave the block before."""

        ctx, family, model = self.ctx, self.family, self.model
        layers_path, layers = family.layers, get_module(model, family.layers)
        if state is None:
            covariances = self._survey(batches, layer_kwargs, eps)
            slicer = build_slicer(model, family, self.config, self.width_rule, covariances, progress=False,
                                  mean_axis=self.mean_axis)
            Q = slicer.slice_embeddings(acts)
            if ctx.is_main:
                write_shard(self.directory, shard_name(1, self.shard_count), self._tensors_of(family.embeddings))
                self.embedding_basis_file = self.work.save_basis(slicer.embedding_basis, "embeddings")
            start, self.added_biases = 0, []
            self._checkpoint(0, Q, acts, slicer.result, settings)
        else:
            slicer = build_slicer(model, family, self.config, self.width_rule, None, progress=False,
                                  mean_axis=self.mean_axis)
            start = state["next_layer"]
            Q = self.work.load_basis(state["basis"], self.device)
            self.embedding_basis_file = state["embedding_basis"]
            slicer.embedding_basis = self.work.load_basis(self.embedding_basis_file, self.device)
            self.added_biases = state["added_biases"]
            acts = self.work.load_activations(state["activations"][ctx.rank], acts.masks, self.device,
                                              self.work.path)
            slicer.result = result_from_dict(state["result"])
            self._say_resuming(start)
        self._free_embeddings()

        for index in self._layer_progress(start):
            layer = self._fused_layer(index, eps)
            Q = slicer.slice_layer(index, layer, acts, layer_kwargs[index], Q)
            self._write_layer(index, layer)
            layer_kwargs[index] = None
            self._checkpoint(index + 1, Q, acts, slicer.result, settings)
            _fault_injection(index, ctx.rank)
        self._slice_head(lambda: slicer.slice_head(Q), eps)
        return slicer.result

    def _run_shared(self, state, settings, acts, layer_kwargs, eps) -> SliceResult:
        """Bases shared across layers (--rotations layer|group:K|model): a first pass over the
        layers collects every stream point's covariance, a second rotates each layer; the
        second needs no activations, and checkpoints after each layer."""

        ctx, family, model = self.ctx, self.family, self.model
        if state is None:
            files, points = self._collect_bases(acts, layer_kwargs, eps)
            ctx.barrier()  # rank 0 wrote the bases
            result = SliceResult(points=points)
            Q_embedding = self.work.load_basis(files["embeddings"], self.device)
            for path in family.embeddings:
                rotate_input(stream_weight(model, path), Q_embedding)
            result.embedding_width = Q_embedding.shape[1]
            if ctx.is_main:
                write_shard(self.directory, shard_name(1, self.shard_count), self._tensors_of(family.embeddings))
            start, self.added_biases = 0, []
            self._checkpoint_shared(0, files, result, settings)
        else:
            start, files = state["next_layer"], state["bases"]
            result, self.added_biases = result_from_dict(state["result"]), state["added_biases"]
            self._say_resuming(start)
        if not isinstance(acts, DiskActivations):  # (spilled ones are discarded at the end of `run`)
            acts.hidden.clear()
        layer_kwargs.clear()
        self._free_embeddings()

        loaded: dict[str, torch.Tensor] = {}  # file -> basis: points of one group share one tensor

        def bases_for(names) -> dict[str, torch.Tensor]:
            wanted = {name: files[name] for name in names if name in files}
            for file in set(loaded) - set(wanted.values()):
                del loaded[file]
            for file in wanted.values():
                if file not in loaded:
                    loaded[file] = self.work.load_basis(file, self.device)
            return {name: loaded[file] for name, file in wanted.items()}

        for index in self._layer_progress(start):
            layer = self._fused_layer(index, eps)
            bases = bases_for([basis_before(index), f"layer {index} mlp input", f"layer {index} output"])
            result.layer_widths.append(rotate_layer(layer, family, index, bases))
            self._write_layer(index, layer)
            self._checkpoint_shared(index + 1, files, result, settings)
            _fault_injection(index, ctx.rank)
        bases = bases_for([f"layer {self.layer_count - 1} output", "embeddings"])
        Q_last = bases[f"layer {self.layer_count - 1} output"]
        self._slice_head(lambda: rotate_head(model, family, Q_last, bases["embeddings"]), eps)
        result.head_in = Q_last.shape[1]
        return result

    def _collect_bases(self, acts, layer_kwargs, eps) -> tuple[dict[str, str], list]:
        """The first pass of `_run_shared`: each stream point's covariance over every batch,
        layer by layer (each layer read and fused as a copy; the second pass fuses it again).
        A group's basis goes to the resume folder once the group is complete, so memory holds
        only the open groups. Returns each point's basis file, and the points' records."""

        family, ctx = self.family, self.ctx
        joint = self.tied and self.config.tied_head_basis == "joint"
        grouping = GroupBases(stream_points(family, self.layer_count), self.layer_count, self.config.group_size,
                              self.width_rule, joint, mean_axis=self.mean_axis)
        normalize = self.config.pca == "normalized"
        files: dict[str, str] = {}

        def accumulator(name: str) -> CovarianceAccumulator:
            return CovarianceAccumulator(self.dense, where=f"at {name}", device=self.device, normalize=normalize)

        def count(name: str, found: CovarianceAccumulator) -> None:
            found.all_reduce()
            done = grouping.add(name, found.sum)
            if done:
                group, basis = done
                tag = f"group{grouping.group_of[group[0]]:05d}"
                file = self.work.save_basis(basis, tag) if ctx.is_main else f"basis-{tag}.safetensors"
                files.update(dict.fromkeys(group, file))

        first = accumulator("embeddings")
        for x, mask in zip(acts.hidden, acts.masks):
            first.add(x, mask)
        count("embeddings", first)
        for index, layer in self._fused_copies(eps, "Collecting covariances (streaming)"):
            mid, out = f"layer {index} mlp input", f"layer {index} output"
            found, current, handles = {out: accumulator(out)}, {}, []
            if mid in grouping.group_of:
                found[mid] = accumulator(mid)
                handles.append(get_module(layer, family.mlp_norm).register_forward_pre_hook(
                    lambda module, args: found[mid].add(args[0], current["mask"])))

            def run(x, kwargs, mask):
                current["mask"] = mask
                y = first_output(layer(x, **kwargs))
                found[out].add(y, mask)
                return y

            try:
                acts.map(run, layer_kwargs[index], acts.masks)
            finally:
                for handle in handles:
                    handle.remove()
            for name in (mid, out):
                if name in found:
                    count(name, found[name])
        if joint:
            count(HEAD_INPUT, self._head_covariance(acts, eps))
        return files, grouping.stream_points()

    def _checkpoint_shared(self, next_layer: int, files: dict[str, str], result: SliceResult,
                           settings: dict) -> None:
        """Record the rotation pass's progress (rank 0): the bases are already in the resume folder."""
        if self.ctx.is_main:
            self.work.write_state({"settings": settings, "next_layer": next_layer, "layers": self.layer_count,
                                   "bases": files, "added_biases": self.added_biases,
                                   "result": result_to_dict(result)})
        self.ctx.barrier()

    # -- steps both kinds of run share ----------------------------------------------------------

    def _say_resuming(self, start: int) -> None:
        if self.progress and self.ctx.is_main:
            print(f"slicegpt: resuming {self.directory} at layer {start}/{self.layer_count}", file=sys.stderr,
                  flush=True)

    def _free_embeddings(self) -> None:
        for path in self.family.embeddings:
            get_module(self.model, path).to("meta")
        release_memory()

    def _layer_progress(self, start: int):
        return tqdm(range(start, self.layer_count), desc="Slicing layers (streaming)", unit="layer",
                    disable=not (self.progress and self.ctx.is_main), initial=start, total=self.layer_count)

    def _fused_layer(self, index: int, eps: float) -> nn.Module:
        """Layer `index` read from the checkpoint and fused, in place in the model."""
        layers = get_module(self.model, self.family.layers)
        self._materialize(f"{self.family.layers}.{index}")
        layer, gained = fuse_layer(layers[index], self.family.for_layer(index), self.dense, eps, self.mean_axis)
        self.added_biases += [f"{self.family.layers}.{index}.{path}" for path in gained]
        layers[index] = layer
        return layer

    def _write_layer(self, index: int, layer: nn.Module) -> None:
        """Write a sliced layer to its shard and free it."""
        if self.ctx.is_main:
            state_dict = {f"{self.family.layers}.{index}.{k}": v for k, v in layer.state_dict().items()}
            write_shard(self.directory, shard_name(index + 2, self.shard_count), state_dict)
        get_module(self.model, self.family.layers)[index] = layer.to("meta")
        release_memory()

    def _capture(self, batches: list[dict], keep_hidden: bool):
        """Layer-0 inputs (in memory, or written to disk batch by batch) and every layer's kwargs."""
        layer_kwargs: list[list[dict]] = [[] for _ in range(self.layer_count)]
        masks = [b.get("attention_mask") for b in batches]

        def one_by_one():
            for batch in batches:
                acts, kwargs = capture_layer_inputs(self.model, self.family, [batch])
                for store, found in zip(layer_kwargs, kwargs):
                    store.extend(found)
                yield acts.hidden[0] if keep_hidden else torch.empty(0)

        if self.spilling and keep_hidden:
            acts = DiskActivations(self.work.path, masks, self.device, prefix=f"acts-rank{self.ctx.rank}")
            acts.hidden = one_by_one()
        else:
            acts = Activations(list(one_by_one()), masks)
        return acts, layer_kwargs

    def _checkpoint(self, next_layer: int, Q: torch.Tensor, acts, result: SliceResult, settings: dict) -> None:
        """Record progress: every rank its activations, rank 0 the basis and state.json."""
        description = self.work.save_activations(acts, next_layer)
        descriptions = self.ctx.gather(description)
        state = None
        if self.ctx.is_main:
            state = {"settings": settings, "next_layer": next_layer, "layers": self.layer_count,
                     "basis": self.work.save_basis(Q, f"layer{next_layer:05d}"), "activations": descriptions,
                     "embedding_basis": self.embedding_basis_file, "added_biases": self.added_biases,
                     "result": result_to_dict(result)}
            self.work.write_state(state)
        state = self.ctx.gather(state)[0]
        self.work.prune(state, acts)

    def _survey(self, batches: list[dict], layer_kwargs: list[list[dict]], eps: float) -> dict | None:
        """The head-input covariance a tied head's joint basis needs (see api.survey): one extra
        pass over the first eighth of the batches, reading every layer once more."""

        if not (self.tied and self.config.tied_head_basis == "joint"):
            return None
        subset = leading_share(batches, SURVEY_SHARE)  # as api.survey
        hidden, _ = capture_layer_inputs(self.model, self.family, subset)
        for index, layer in self._fused_copies(eps, "Surveying the head input (streaming)"):
            hidden.map(lambda x, kw: first_output(layer(x, **kw)), layer_kwargs[index][:len(subset)])
        return {HEAD_INPUT: self._head_covariance(hidden, eps)}

    def _fused_copies(self, eps: float, description: str):
        """Each layer in turn, read and fused as a copy (fusing works in place, and the slicing
        pass needs the original); yields (index, fused copy) and frees it afterwards."""
        layers = get_module(self.model, self.family.layers)
        for index in tqdm(range(self.layer_count), desc=description, unit="layer",
                          disable=not (self.progress and self.ctx.is_main)):
            untouched = layers[index]
            layers[index] = copy.deepcopy(untouched)
            self._materialize(f"{self.family.layers}.{index}")
            layer, _ = fuse_layer(layers[index], self.family.for_layer(index), self.dense, eps, self.mean_axis)
            yield index, layer
            layers[index] = untouched
            layer.to("meta")  # frees the weights even while the caller still names the copy
            del layer
            release_memory()

    def _head_covariance(self, acts, eps: float) -> CovarianceAccumulator:
        """The covariance a tied head reads (the final map's output), all-reduced."""
        family = self.family
        head_map = final_map(get_module(self.model, family.final_norm), family.norm_kind, self.dense, eps,
                             like=get_module(self.model, family.embeddings[0]).weight, mean_axis=self.mean_axis)
        accumulator = CovarianceAccumulator(self.dense, where="at the head", device=self.device)
        for x, mask in zip(acts.hidden, acts.masks):
            accumulator.add(head_map(x), mask)
        accumulator.all_reduce()
        return accumulator

    def _slice_head(self, rotate, eps: float) -> None:
        """Fuse the head (or a tied head's final map), `rotate()` it, write the last shard."""
        family, model = self.family, self.model
        head_bias: dict[str, torch.Tensor] = {}
        if self.tied:  # reads the embedding through the final map: only a bias of its own (Phi) to read and write
            like = torch.empty(0, dtype=self.dtype, device=self.device)  # the embedding is on meta by now
            self._materialize(family.head, skip=(f"{family.head}.weight",))
            head_bias = {f"{family.head}.{k}": v for k, v in get_module(model, family.head).state_dict().items()
                         if k != "weight"}
            self.added_biases += fuse_head(model, family, True, self.dense, eps, like=like)
            rotate()
            written: tuple[str, ...] = ()
        else:
            alias = {}
            if self.source_tied:  # the head reads the input embedding's weights
                alias[f"{family.head}.weight"] = f"{family.embeddings[0]}.weight"
            self._materialize(family.head, alias=alias)
            self.added_biases += fuse_head(model, family, False, self.dense, eps)
            rotate()
            written = (family.head,)
        if self.ctx.is_main:
            tensors = {**self._tensors_of(written), **head_bias}
            # Anything else the model holds outside the layers (none, for the supported families).
            skip = (family.layers, *family.embeddings, family.head)
            for name, param in model.named_parameters():
                if param.device.type != "meta" and not any(name.startswith(s + ".") for s in skip):
                    tensors[name] = param
            write_shard(self.directory, shard_name(self.shard_count, self.shard_count), tensors)

    def _tensors_of(self, paths) -> dict[str, torch.Tensor]:
        return {f"{path}.{k}": v for path in paths for k, v in get_module(self.model, path).state_dict().items()}

    # -- publishing -------------------------------------------------------------------------------

    def parameter_counts(self) -> dict:
        """Real counts from the written shards (rank 0, after `run`)."""
        index = write_index(self.directory)
        shapes = SafetensorsCheckpoint(self.directory).shapes()
        return {
            "dense": self.checkpoint.parameter_count(),
            "sliced": index["metadata"]["total_parameters"],
            "shortcuts": sum(math.prod(s) for n, s in shapes.items() if "_shortcut." in n),
            # As report.head_parameters: an untied head, or the map after the final norm.
            "head": sum(math.prod(s) for n, s in shapes.items()
                        if n.startswith((self.family.head + ".", self.family.final_norm + ".map."))),
        }

    def finish(self, tokenizer, extra_files: dict[str, str] | None = None) -> Path:
        """Write config, tokenizer and modeling file, drop the checkpoints, rename into place."""
        if not self.ctx.is_main:
            return self.out
        from transformers import GenerationConfig

        config = self.model.config
        config.auto_map = AUTO_MAP
        config.architectures = [type(self.model).__name__]
        config.dtype = self.dtype
        write_index(self.directory)
        config.save_pretrained(self.directory)
        try:
            GenerationConfig.from_pretrained(self.model_dir).save_pretrained(self.directory)
        except OSError:
            pass  # the source has no generation_config.json
        write_companion_files(config, tokenizer, self.directory, extra_files)
        shutil.rmtree(self.work.path, ignore_errors=True)
        if self.out.exists():
            check_output_dir(self.out, self.overwrite)
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        ordinary_permissions(self.directory)
        self.directory.rename(self.out)
        return self.out


def _fault_injection(layer: int, rank: int) -> None:
    after = os.environ.get(KILL_AFTER_LAYER_ENV)
    only_rank = os.environ.get(KILL_RANK_ENV)
    if after is not None and int(after) == layer and (only_rank is None or int(only_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


def report_spill(plan: dict) -> str:
    where = "on disk (spilled)" if plan["spill"] else "in memory"
    return (f"streaming: calibration activations {gib(plan['activations_bytes'])} {where}; "
            f"output about {gib(plan['output_bytes_estimate'])}")
