"""The Python API: slice an in-memory model, in place."""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.architectures.families import family_for
from slicegpt.config import SliceConfig
from slicegpt.io.data import calibration_batches, load_texts
from slicegpt.method.slicing import SliceResult
from slicegpt.running.driver import slice_layers
from slicegpt.running.layer_store import ResidentStore
from slicegpt.sizing.layout import resolve_layout


def calibration_data(tokenizer, config: SliceConfig, texts: list[str] | None = None) -> list[dict]:
    """Calibration batches from `texts`, or from `config.cal_data` when none are given."""
    if texts is None:
        texts = load_texts(config.cal_data, split="train")
    return calibration_batches(tokenizer, texts, config.cal_samples, config.cal_seqlen,
                               config.cal_batch_size, config.seed)


@torch.no_grad()
def slice_model(model: nn.Module, tokenizer, config: SliceConfig, calibration: list[str] | list[dict] | None = None,
                progress: bool = True) -> SliceResult:
    """Fuse, rotate and slice `model` in place; afterwards `save_sliced` can write it.

    `calibration` is a list of texts, a list of ready batches ({"input_ids", "attention_mask"}),
    or None to load `config.cal_data`.
    """
    family = family_for(model)  # fails here, before any work, on an unknown architecture
    config = resolve_layout(model, family, config)
    if calibration and isinstance(calibration[0], dict):
        batches = calibration
    else:
        batches = calibration_data(tokenizer, config, calibration)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    model.eval()
    return slice_layers(ResidentStore(model, family, config, progress), config, batches)
