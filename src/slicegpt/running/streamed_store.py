"""The layer store of a streaming run: weights read layer by layer from safetensors shards.

The model is a skeleton on the meta device. Each layer is read (only its own tensors,
converted as `from_pretrained` converts them), fused, handed to the driver, written to its
own output shard once sliced, and freed; passes that only read (covariances) get a fused
copy that is freed at once. Activations stay in memory, or spill to a file on disk when
they do not fit (`spill.DiskActivations`). After every layer the store checkpoints into
the `resume/` folder beside the output (see `resume.py`). Peak memory is one layer plus
one layer's calibration activations (two streams with the refit).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.architectures.family import get_module
from slicegpt.io.converted import ConvertedCheckpoint
from slicegpt.io.shards import SafetensorsCheckpoint, shard_name, write_shard
from slicegpt.method.activations import Activations
from slicegpt.method.fusion import final_map, fuse_embeddings, fuse_head, fuse_layer, keep_head_tied, norm_eps, \
    uses_mean_axis
from slicegpt.method.slicing import capture_layer_inputs
from slicegpt.running.distributed import DistContext
from slicegpt.running.resources import available_memory, check_disk, dtype_bytes, release_memory
from slicegpt.running.resume import WorkDir
from slicegpt.running.spill import DiskActivations

# Test hook: SIGKILL this process right after the checkpoint that follows layer N
# (on rank SLICEGPT_TEST_KILL_RANK only, when that is set). Nothing else reads these.
KILL_AFTER_LAYER_ENV = "SLICEGPT_TEST_KILL_AFTER_LAYER"
KILL_RANK_ENV = "SLICEGPT_TEST_KILL_RANK"
# Tests: stop (SIGSTOP) after checkpointing this layer, a run frozen mid-way that still holds its output.
STOP_AFTER_LAYER_ENV = "SLICEGPT_TEST_STOP_AFTER_LAYER"


class StreamedStore:
    """Reads `model` (a meta skeleton of the checkpoint in `model_dir`) layer by layer, and writes
    the sliced shards into `directory`."""

    def __init__(self, model_dir: Path, model: nn.Module, family, config, directory: Path, *,
                 dtype: torch.dtype, ctx: DistContext, spill: str, fresh: bool, progress: bool):
        self.model_dir, self.model, self.family, self.config = model_dir, model, family, config
        self.directory, self.dtype, self.ctx = directory, dtype, ctx
        self.device = torch.device(ctx.device)
        self.spill, self.fresh, self.progress = spill, fresh, progress and ctx.is_main
        self.checkpoint_files = SafetensorsCheckpoint(model_dir)
        self.tensors = ConvertedCheckpoint(self.checkpoint_files, model)  # by the model's own names
        text_config = model.config.get_text_config()
        # Tied in the source checkpoint (the head is read from the embedding's tensor) ...
        self.source_tied = bool(getattr(text_config, "tie_word_embeddings", False))
        # ... and in the output (a map after the final norm; see fusion.NormThenMap).
        self.tied = keep_head_tied(model, family, config.tied_head)
        self.mean_axis = uses_mean_axis(family, self.tied)  # LayerNorm and tied: see fusion.py
        self.dense = model.config.hidden_size
        self.layer_count = len(get_module(model, family.layers))
        self.work = WorkDir(directory / "resume", ctx.rank)
        self.shard_count = self.layer_count + 2  # embeddings, each layer, head
        self.spilling = False
        self.added_biases: list[str] = []
        self.eps = 0.0
        self.state: dict | None = None

    # -- settings and resources -------------------------------------------------------------

    def settings(self) -> dict:
        """What must be equal for a checkpoint to be resumed."""
        files = {p.name: p.stat().st_size for p in self.checkpoint_files.files()}
        return {**self.config.to_dict(), "model": str(self.model_dir.resolve()), "model_files": files,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type,
                "world_size": self.ctx.world_size}

    def plan(self, batches: list[dict]) -> dict:
        """Decide whether activations spill, and check disk space; before any work."""
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        streams = 2 if self.config.refit else 1  # the refit carries the dense stream too
        acts = tokens * self.dense * dtype_bytes(self.dtype) * streams
        shapes = self.checkpoint_files.shapes()
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
            check_disk(self.directory.parent, {"output": output, "activations and checkpoints": work}, already)
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

    # -- the store ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Start over (--fresh) or load a matching checkpoint; read and fuse the embeddings."""
        ctx, family = self.ctx, self.family
        if self.fresh and ctx.is_main and self.directory.exists():
            shutil.rmtree(self.directory)
        ctx.barrier()
        self.state = self.work.load(self.settings())
        if ctx.is_main:
            self.work.path.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        self._materialize("", skip=(family.layers, family.head))
        fuse_embeddings(self.model, family, self.tied)
        self.eps = norm_eps(self.model, family)
        if self.state is not None:
            self.added_biases = list(self.state["added_biases"])
            if self.progress:
                print(f"slicegpt: resuming {self.directory} at layer {self.state['next_layer']}/{self.layer_count}",
                      file=sys.stderr, flush=True)

    def resume(self) -> dict | None:
        return self.state

    def capture(self, batches: list[dict], keep_hidden: bool = True):
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

    def copy(self, acts, name: str, fn: Callable | None = None):
        batches = (x if fn is None else fn(x) for x in acts.hidden)
        if not self.spilling:
            return Activations(list(batches), acts.masks)
        copied = DiskActivations(self.work.path, acts.masks, self.device, prefix=f"{name}-rank{self.ctx.rank}")
        copied.hidden = batches
        return copied

    def close_embeddings(self, write: bool = True) -> None:
        if write and self.ctx.is_main:
            write_shard(self.directory, shard_name(1, self.shard_count), self._tensors_of(self.family.embeddings))
        for path in self.family.embeddings:
            get_module(self.model, path).to("meta")
        release_memory()

    def layer(self, index: int) -> nn.Module:
        """Layer `index` read from the checkpoint and fused, in place in the model."""
        layers = get_module(self.model, self.family.layers)
        self._materialize(f"{self.family.layers}.{index}")
        layer, gained = fuse_layer(layers[index], self.family.for_layer(index), self.dense, self.eps, self.mean_axis)
        self.added_biases += [f"{self.family.layers}.{index}.{path}" for path in gained]
        layers[index] = layer
        return layer

    def close_layer(self, index: int, layer: nn.Module) -> None:
        """Write a sliced layer to its shard and free it."""
        if self.ctx.is_main:
            state_dict = {f"{self.family.layers}.{index}.{k}": v for k, v in layer.state_dict().items()}
            write_shard(self.directory, shard_name(index + 2, self.shard_count), state_dict)
        get_module(self.model, self.family.layers)[index] = layer.to("meta")
        release_memory()

    def dense_layers(self, description: str):
        """Each layer in turn, read and fused as a copy (the slicing pass fuses the original);
        yields (index, fused copy) and frees it afterwards."""
        layers = get_module(self.model, self.family.layers)
        for index in tqdm(range(self.layer_count), desc=f"{description} (streaming)", unit="layer",
                          disable=not self.progress):
            untouched = layers[index]
            layers[index] = copy.deepcopy(untouched)
            self._materialize(f"{self.family.layers}.{index}")
            layer, _ = fuse_layer(layers[index], self.family.for_layer(index), self.dense, self.eps, self.mean_axis)
            yield index, layer
            layers[index] = untouched
            layer.to("meta")  # frees the weights even while the caller still names the copy
            del layer
            release_memory()

    def head_map(self) -> nn.Module:
        """The map a tied head reads through, built from the final norm (fusion builds the same)."""
        family = self.family
        return final_map(get_module(self.model, family.final_norm), family.norm_kind, self.dense, self.eps,
                         like=get_module(self.model, family.embeddings[0]).weight, mean_axis=self.mean_axis)

    def close_head(self, rotate: Callable[[], None]) -> None:
        """Fuse the head (or a tied head's final map), `rotate()` it, write the last shard."""
        family, model = self.family, self.model
        head_bias: dict[str, torch.Tensor] = {}
        if self.tied:  # reads the embedding through the final map: only a bias of its own (Phi) to read and write
            like = torch.empty(0, dtype=self.dtype, device=self.device)  # the embedding is on meta by now
            self._materialize(family.head, skip=(f"{family.head}.weight",))
            head_bias = {f"{family.head}.{k}": v for k, v in get_module(model, family.head).state_dict().items()
                         if k != "weight"}
            self.added_biases += fuse_head(model, family, True, self.dense, self.eps, like=like)
            rotate()
            written: tuple[str, ...] = ()
        else:
            alias = {}
            if self.source_tied:  # the head reads the input embedding's weights
                alias[f"{family.head}.weight"] = f"{family.embeddings[0]}.weight"
            self._materialize(family.head, alias=alias)
            self.added_biases += fuse_head(model, family, False, self.dense, self.eps)
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

    # -- bases and checkpoints --------------------------------------------------------------------

    def keep_basis(self, Q: torch.Tensor, tag: str) -> str:
        """Save a basis (rank 0) into the resume folder; returns its file name."""
        return self.work.save_basis(Q, tag) if self.ctx.is_main else f"basis-{tag}.safetensors"

    def basis(self, handle: str) -> torch.Tensor:
        return self.work.load_basis(handle, self.device)

    def barrier(self) -> None:
        self.ctx.barrier()

    def checkpoint(self, next_layer: int, record: Callable[[], dict], streams: dict) -> None:
        """Record progress: every rank its activation streams, rank 0 `record()` and state.json."""
        descriptions = self.ctx.gather({name: self.work.save_activations(acts, next_layer, name)
                                        for name, acts in streams.items()})
        state = None
        if self.ctx.is_main:
            state = {"settings": self.settings(), "next_layer": next_layer, "layers": self.layer_count,
                     "added_biases": self.added_biases, **record(), "activations": descriptions}
            self.work.write_state(state)
        state = self.ctx.gather(state)[0]
        self.work.prune(state, streams)
        if next_layer > 0:
            _fault_injection(next_layer - 1, self.ctx.rank)

    def restore(self, state: dict, masks: list) -> dict:
        """This rank's activation streams as the checkpoint recorded them."""
        return {name: self.work.load_activations(description, masks, self.device, name)
                for name, description in state["activations"][self.ctx.rank].items()}


def _fault_injection(layer: int, rank: int) -> None:
    after = os.environ.get(KILL_AFTER_LAYER_ENV)
    only_rank = os.environ.get(KILL_RANK_ENV)
    if after is not None and int(after) == layer and (only_rank is None or int(only_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)
    stop = os.environ.get(STOP_AFTER_LAYER_ENV)
    if stop is not None and int(stop) == layer and rank == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
