"""The Python API: slice an in-memory model, in place."""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.config import SliceConfig
from slicegpt.running.distributed import leading_share
from slicegpt.io.data import calibration_batches, load_texts
from slicegpt.sizing.budget import parameter_budget, width_for_budget
from slicegpt.architectures.families import Family, family_for, get_module
from slicegpt.method.fusion import fuse, has_mean_axis, norm_eps
from slicegpt.sizing.layout import resolve_layout
from slicegpt.architectures.modeling_sliced import NormThenMap
from slicegpt.method.pca import CovarianceAccumulator
from slicegpt.method.shared_rotation import HEAD_INPUT, collect_covariances, rotate_shared
from slicegpt.sizing.schedule import spectra_of, variance_schedule
from slicegpt.method.slicing import SliceResult, Slicer, WidthRule, constant_width, slicing_metadata


def calibration_data(tokenizer, config: SliceConfig, texts: list[str] | None = None) -> list[dict]:
    """Calibration batches from `texts`, or from `config.cal_data` when none are given."""
    if texts is None:
        texts = load_texts(config.cal_data, split="train")
    return calibration_batches(tokenizer, texts, config.cal_samples, config.cal_seqlen,
                               config.cal_batch_size, config.seed)


# The share of the calibration batches (at least one) a survey reads: 8 of protocol P's 64
# sequences, 16k tokens, is plenty for a 576-wide covariance; the survey costs that share of
# a dense forward.
SURVEY_SHARE = 0.125


def survey(model: nn.Module, family: Family, config: SliceConfig, batches: list[dict],
           progress: bool) -> dict[str, CovarianceAccumulator] | None:
    """Covariances at every stream point of the fused dense model, where the config needs them.

    An eighth of the calibration batches (at least one) is enough for what they decide:
    per-point widths, and the basis a tied head shares with the embeddings.
    """
    tied = isinstance(get_module(model, family.final_norm), NormThenMap)
    joint_head = tied and config.tied_head_basis == "joint" and config.rotations == "block"
    if config.widths != "variance" and not joint_head:
        return None
    subset = leading_share(batches, SURVEY_SHARE)
    return collect_covariances(model, family, subset, progress, normalize=config.pca == "normalized",
                               head_only=config.widths != "variance")


def width_rule_for(model: nn.Module, family: Family, config: SliceConfig,
                   covariances: dict[str, CovarianceAccumulator] | None, budget: int | None) -> WidthRule:
    """How wide each stream point stays (called on the fused model)."""
    if config.widths == "variance":
        widths = variance_schedule(model, family, config, spectra_of(covariances, has_mean_axis(model, family)),
                                   budget)
        return lambda name, eigenvalues: widths[name]
    if budget is None:
        return constant_width(config.kept_width(model.config.hidden_size))
    return constant_width(width_for_budget(model, family, config, budget))


def build_slicer(model: nn.Module, family: Family, config: SliceConfig, width_rule: WidthRule,
                 covariances: dict[str, CovarianceAccumulator] | None, progress: bool = True,
                 mean_axis: bool | None = None) -> Slicer:
    """The layer-by-layer Slicer for these settings (shared by the in-memory and streaming runs)."""
    head = covariances.get(HEAD_INPUT) if covariances and config.tied_head_basis == "joint" else None
    return Slicer(model, family, width_rule, progress=progress,
                  normalize_pca=config.pca == "normalized", head_covariance=None if head is None else head.sum,
                  refit=config.refit, mean_axis=mean_axis)


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
    budget = parameter_budget(model, family, config)
    added_biases = fuse(model, family, keep_tied=config.tied_head)
    covariances = survey(model, family, config, batches, progress)
    width_rule = width_rule_for(model, family, config, covariances, budget)
    if config.rotations == "block":
        result = build_slicer(model, family, config, width_rule, covariances, progress).run(batches)
    else:
        result = rotate_shared(model, family, batches, width_rule, group_size=config.group_size, progress=progress,
                               normalize_pca=config.pca == "normalized",
                               joint_head=config.tied_head_basis == "joint", refit=config.refit)
    model.config.slicing = slicing_metadata(model, family, result, norm_eps(model, family), added_biases)
    model.config.slicing["config"] = config.to_dict()
    return result
