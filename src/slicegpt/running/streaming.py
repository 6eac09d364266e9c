"""Streaming mode: slice a model larger than memory, one decoder layer at a time.

The model is built without weights (meta device); `StreamedStore` (streamed_store.py)
reads each layer from the safetensors shards as the driver (driver.py) needs it, and
writes it to its own output shard once sliced. The driver is the one the in-memory run
uses, so every layout and option runs streamed too, and the result equals the in-memory
run's, tensor for tensor. Output is built in `.<name>.partial` beside the output
directory and renamed into place at the end. After each layer the run checkpoints into
its `resume/` folder (see `resume.py`), so the same command resumes after a crash or kill -9.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from torch import nn

from slicegpt.architectures.families import family_for
from slicegpt.config import SliceConfig
from slicegpt.io.checkpoint import AUTO_MAP, check_output_dir, sliced_architecture, write_companion_files
from slicegpt.io.permissions import ordinary_permissions
from slicegpt.io.shards import SafetensorsCheckpoint, write_index
from slicegpt.method.slicing import SliceResult
from slicegpt.running.distributed import DistContext
from slicegpt.running.driver import slice_layers
from slicegpt.running.resources import gib
from slicegpt.running.streamed_store import KILL_AFTER_LAYER_ENV, KILL_RANK_ENV, StreamedStore  # noqa: F401
from slicegpt.sizing.layout import resolve_layout


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


class StreamingRun:
    """One streaming slicing run: `plan` checks resources, `run` slices, `finish` publishes."""

    def __init__(self, model_dir: str | Path, out: str | Path, config: SliceConfig, *,
                 dtype: torch.dtype = torch.float32, ctx: DistContext | None = None, spill: str = "auto",
                 fresh: bool = False, overwrite: bool = False, progress: bool = True):
        self.model_dir, self.out, self.overwrite = Path(model_dir), Path(out), overwrite
        self.dtype, self.ctx = dtype, ctx or DistContext()
        check_output_dir(self.out, overwrite)
        self.checkpoint = SafetensorsCheckpoint(self.model_dir)
        self.model = empty_model(self.model_dir, dtype)
        self.family = family_for(self.model)
        self.config = resolve_layout(self.model, self.family, config)
        self.directory = partial_dir(self.out)
        self.store = StreamedStore(self.model_dir, self.model, self.family, self.config, self.directory, dtype=dtype,
                                   ctx=self.ctx, spill=spill, fresh=fresh, progress=progress)

    def plan(self, batches: list[dict]) -> dict:
        """Decide whether activations spill, and check disk space; before any work."""
        return self.store.plan(batches)

    @torch.no_grad()
    def run(self, batches: list[dict]) -> SliceResult:
        """Slice layer by layer, checkpointing after each; resumes a matching interrupted run."""
        batches = [{k: v.to(self.store.device) for k, v in b.items()} for b in batches]
        result = slice_layers(self.store, self.config, batches)
        self.ctx.barrier()
        return result

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
        config.architectures = [sliced_architecture(config.slicing)]
        config.dtype = self.dtype
        write_index(self.directory)
        config.save_pretrained(self.directory)
        try:
            GenerationConfig.from_pretrained(self.model_dir).save_pretrained(self.directory)
        except OSError:
            pass  # the source has no generation_config.json
        write_companion_files(config, tokenizer, self.directory, extra_files)
        shutil.rmtree(self.store.work.path, ignore_errors=True)
        if self.out.exists():
            check_output_dir(self.out, self.overwrite)
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        ordinary_permissions(self.directory)
        self.directory.rename(self.out)
        return self.out



def report_spill(plan: dict) -> str:
    where = "on disk (spilled)" if plan["spill"] else "in memory"
    return (f"streaming: calibration activations {gib(plan['activations_bytes'])} {where}; "
            f"output about {gib(plan['output_bytes_estimate'])}")
