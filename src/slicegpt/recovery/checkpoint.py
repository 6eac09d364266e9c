"""Checkpoints of a recovery fine-tuning run, so that a stopped run continues where it was.

One safetensors file holds the trained weights (LoRA adapters, or every decoder weight),
AdamW's moments, and the random states (the window sampler's, torch's CPU one, and every
GPU's, which drive the dropout of a model there); its metadata holds the step, the losses so far and the settings. A resumed run draws the same windows and dropout masks as
an uninterrupted one, so it ends with the same weights. The file is written beside and
renamed into place: a kill while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slicegpt.errors import SliceGPTError

CHECKPOINT_FILE = "rft_checkpoint.safetensors"


def save_state(directory: Path, step: int, named_params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               generator: torch.Generator, record: dict, settings: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"trained/{name}": param.detach().cpu().contiguous() for name, param in named_params.items()}
    index = {id(p): name for name, p in named_params.items()}
    adam_steps = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            name = index[id(param)]
            tensors[f"adam/{name}/exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"adam/{name}/exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
            adam_steps[name] = float(state["step"])
    tensors["rng/windows"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    tensors.update(cuda_rng_states())
    metadata = {"step": str(step), "record": json.dumps(record), "settings": json.dumps(settings, sort_keys=True),
                "adam_steps": json.dumps(adam_steps)}
    path = directory / CHECKPOINT_FILE
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def load_state(directory: Path, named_params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               generator: torch.Generator, settings: dict) -> tuple[int, dict] | None:
    """Restore a checkpoint into the parameters, optimizer and generator; (step, record), or None if none."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    saved = json.loads(metadata["settings"])
    if saved != json.loads(json.dumps(settings, sort_keys=True)):
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise SliceGPTError(f"the fine-tuning checkpoint in {directory} was made with other settings "
                            f"({', '.join(changed)}); use the same settings, or remove {path} to start over")
    tensors = load_file(str(path))
    adam_steps = json.loads(metadata["adam_steps"])
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(tensors[f"trained/{name}"])
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = next(n for n, p in named_params.items() if p is param)
            if name in adam_steps:
                optimizer.state[param] = {"step": torch.tensor(adam_steps[name]),
                                          "exp_avg": tensors[f"adam/{name}/exp_avg"].to(param.device),
                                          "exp_avg_sq": tensors[f"adam/{name}/exp_avg_sq"].to(param.device)}
    generator.set_state(tensors["rng/windows"])
    torch.set_rng_state(tensors["rng/torch"])
    restore_cuda_rng(tensors)
    return int(metadata["step"]), json.loads(metadata["record"])


def cuda_rng_states() -> dict[str, torch.Tensor]:
    """Each GPU's random state as `rng/cuda/N`; none where CUDA was never started (nothing ran there)."""
    if not torch.cuda.is_initialized():
        return {}
    return {f"rng/cuda/{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())}


def restore_cuda_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set the GPUs' random states saved by `cuda_rng_states`, for as many GPUs as are visible now."""
    count = sum(1 for name in tensors if name.startswith("rng/cuda/"))
    if count and torch.cuda.is_available():
        states = [tensors[f"rng/cuda/{index}"] for index in range(count)]
        torch.cuda.set_rng_state_all(states[:torch.cuda.device_count()])
