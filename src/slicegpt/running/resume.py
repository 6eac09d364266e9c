"""Checkpoints of a streaming run, so that a killed run resumes where it stopped.

After each layer the run records, in `<partial output>/resume/`: the settings, the next
layer to slice, the parameters fusion gave a bias, the result so far, the widths where
they came from spectra, the files of the bases the rest of the run needs, and each
rank's activation streams (the sliced one, and the dense one under the refit). Per-block
bases keep the basis entering the next layer and the embedding basis; shared bases keep
every stream point's group basis (written by the covariance pass), and carry no
activations unless the refit, or the readers' importance of a model too wide to hold their
covariances, needs the dense stream (method/importance.py). The sliced layers themselves are already in
the output shards beside it. `state.json` is replaced atomically and written last, so
it always describes files that exist; files it no longer names are deleted only after
it is replaced. A run with other settings than the recorded ones is refused, naming the
first setting that differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slicegpt.errors import SliceGPTError
from slicegpt.io.write_failure import removed_on_failure
from slicegpt.method.activations import Activations
from slicegpt.method.slicing import SliceResult, StreamPoint
from slicegpt.running.spill import DiskActivations

STATE_FILE = "state.json"
FORMAT = 2


def result_to_dict(result: SliceResult) -> dict:
    return dataclasses.asdict(result)


def result_from_dict(data: dict) -> SliceResult:
    data = dict(data)
    points = [StreamPoint(**p) for p in data.pop("points", [])]
    return SliceResult(points=points, **data)


def _short(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WorkDir:
    """The resume directory of one run, as seen by one rank."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.rank = rank

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def load(self, settings: dict) -> dict | None:
        """The recorded state if there is one and its settings match; refuses otherwise."""
        if not self.state_file.is_file():
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except ValueError:
            raise SliceGPTError(f"{self.state_file} is damaged; delete {self.path.parent} (or pass --fresh) "
                                "to start over") from None
        if state.get("format") != FORMAT:
            raise SliceGPTError(f"the interrupted run in {self.path.parent} was recorded by another version of "
                                "slicegpt; pass --fresh to discard it and start over")
        recorded = state.get("settings", {})
        for key in sorted(set(recorded) | set(settings)):
            if recorded.get(key) != settings.get(key):
                raise SliceGPTError(
                    f"cannot resume the interrupted run in {self.path.parent}: it used {key}={_short(recorded.get(key))}, "
                    f"this run has {key}={_short(settings.get(key))}; rerun with the same settings to resume, "
                    "or pass --fresh to discard it and start over")
        return state

    def save_activations(self, acts, layer: int, stream: str = "acts") -> dict:
        """This rank's activations of one stream as they enter layer `layer`; returns their description."""
        if isinstance(acts, DiskActivations):
            return {"kind": "disk", **acts.pin()}
        name = f"{stream}-rank{self.rank}-layer{layer:05d}.safetensors"
        tensors = {f"hidden.{i}": x for i, x in enumerate(acts.hidden)}
        self._atomic_save(tensors, name)
        return {"kind": "memory", "file": name, "batches": len(acts.hidden)}

    def load_activations(self, description: dict, masks: list, device, stream: str = "acts"):
        if description["kind"] == "disk":
            return DiskActivations.restore(self.path, description, masks, device, prefix=f"{stream}-rank{self.rank}")
        tensors = load_file(self.path / description["file"], device="cpu")
        hidden = [tensors[f"hidden.{i}"].to(device) for i in range(description["batches"])]
        return Activations(hidden, masks)

    def save_basis(self, Q: torch.Tensor, tag: str) -> str:
        """Save a basis as basis-<tag>.safetensors ("layer00012": the one entering layer 12)."""
        name = f"basis-{tag}.safetensors"
        self._atomic_save({"Q": Q}, name)
        return name

    def load_basis(self, name: str, device) -> torch.Tensor:
        return load_file(self.path / name, device="cpu")["Q"].to(device)

    def write_state(self, state: dict) -> None:
        """Replace state.json atomically (rank 0 only), then drop the files it no longer names."""
        tmp = self.state_file.with_name(f".{STATE_FILE}.tmp")
        with removed_on_failure(tmp), open(tmp, "w") as f:
            f.write(json.dumps({"format": FORMAT, **state}, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def prune(self, state: dict, streams: dict) -> None:
        """Delete this rank's checkpoint files that `state` no longer names."""
        mine = state["activations"][self.rank]
        keep = {*state["bases"].values(), *(description["file"] for description in mine.values())}
        for path in self.path.glob(f"*-rank{self.rank}-layer*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        if self.rank == 0:
            for path in self.path.glob("basis-layer*.safetensors"):
                if path.name not in keep:
                    path.unlink(missing_ok=True)
        for name, acts in streams.items():
            if isinstance(acts, DiskActivations):
                acts.release(keep=mine[name])

    def _atomic_save(self, tensors: dict, name: str) -> None:
        final = self.path / name
        tmp = final.with_name(f".{name}.tmp")
        with removed_on_failure(tmp):
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
