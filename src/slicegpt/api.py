"""The Python API: slice an in-memory model, in place."""

from __future__ import annotations

import torch
from torch import nn

from .config import SliceConfig
from .data import calibration_batches, load_texts
from .families import family_for
from .fusion import fuse, norm_eps
from .slicing import SliceResult, Slicer, constant_width, slicing_metadata


def calibration_data(tokenizer, config: SliceConfig, texts: list[str] | None = None) -> list[dict]:
    """Calibration batches from `texts`, or from `config.cal_data` when none are given."""
    if texts is None:
        texts = load_texts(config.cal_data, split="train")
    return calibration_batches(tokenizer, texts, config.cal_samples, config.cal_seqlen,
                               config.cal_batch_size, config.seed)


def build_slicer(model: nn.Module, family, config: SliceConfig, progress: bool = True) -> Slicer:
    """The Slicer for a fused model and these settings (shared by the in-memory and streaming runs)."""
    width = config.kept_width(model.config.hidden_size)
    return Slicer(model, family, constant_width(width), progress=progress)


@torch.no_grad()
def slice_model(model: nn.Module, tokenizer, config: SliceConfig, calibration: list[str] | list[dict] | None = None,
                progress: bool = True) -> SliceResult:
    """Fuse, rotate and slice `model` in place; afterwards `save_sliced` can write it.

    `calibration` is a list of texts, a list of ready batches ({"input_ids", "attention_mask"}),
    or None to load `config.cal_data`.
    """
    family = family_for(model)  # fails here, before any work, on an unknown architecture
    if calibration and isinstance(calibration[0], dict):
        batches = calibration
    else:
        batches = calibration_data(tokenizer, config, calibration)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    model.eval()
    fuse(model, family)
    result = build_slicer(model, family, config, progress).run(batches)
    model.config.slicing = slicing_metadata(model, family, result, norm_eps(model, family))
    model.config.slicing["config"] = config.to_dict()
    return result
