"""`--rotations auto` (the default): the layout measured best for the size asked for.

The size comes first. `--sparsity S` keeps the paper's meaning: the real size of slicing
S of the width with a basis per block (two shortcuts per layer); `--target-params` and
`--target-ratio` give it directly. Then auto spends that size on the layout that measured
best there (protocol P on SmolLM2-135M, bench/README.md):

- wherever the refit runs (`--refit auto` with enough calibration tokens, or `--refit`),
  one basis for the whole model: no shortcuts, so the same size buys a wider stream, and
  the refit carries the layers through the cut. It beat per-block bases of the same size
  at every size measured on the passages neither saw (LAMBADA: 3.42 x dense against
  9.09 x at 0.765 x, 5.00 x against 11.55 x at 0.70 x) and on WikiText-2 down to 0.765 x
  (48.61 against 57.34); at 0.70 x per-block bases fit WikiText-2 better (68.52 against
  78.35) but generalise worse. On a held-out 0.5B Qwen2 model one basis with the refit
  was both smaller and far better (1.49 x dense against 2.78 x at 0.75-0.78 x).
- without the refit, one basis still wins from 0.8 x dense up (45.78 at 0.821 x and 39.51
  at 0.849 x, against 47.80 for per-block bases at 0.834 x), but below it cannot follow
  the stream through every layer (71.14 at 0.751 x, against 57.34 at 0.767 x), so
  per-block bases are kept there.

Groups of 10 layers with the refit lost to one basis at the same size (63.24 at 0.754 x,
LAMBADA 6.67 x: their shortcuts cost width). Families with post-norms (Gemma-2/3, OLMo-2)
always keep per-block bases: on Gemma 3 270M one basis for the whole model gave
perplexities above 1e9 at 0.85 x dense where per-block bases stay finite
(bench/README.md).

`--widths auto` (the default) comes first: for families with post-norms it slices only the
embeddings (`--widths embedding`, at the size asked for) where that keeps at least half
the embedding width, because on Gemma 3 270M, whose embedding is 63% of the model, that
lost far less than per-block bases at the same size (bench/README.md); everywhere else,
one width for every point.

A positive sparsity never gives a model larger than dense: where the per-block layout at S
would be (small models, where the shortcuts outweigh what slicing saves; mild cuts), the
size asked for becomes (1 - S) x dense, and auto spends it on the layout the rule above
picks, or on one basis for the whole model where no per-block width is that small.

`--pca auto` (the default) then picks how tokens weigh in the PCA: every token equally
(normalized, as the RMS norms that read the stream see it) for one basis for the whole
model, where it measured better (43.01 against 45.78 at 0.821 x; 37.45 against 39.51 at
0.849 x), and the stream as it is (raw) for the other layouts: per-block bases lost with
normalized weights (91.32 against 54.16 on a reduced protocol).
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from slicegpt.errors import SliceGPTError
from slicegpt.sizing.budget import parameter_budget, uniform_size, width_for_budget
from slicegpt.config import SliceConfig, leading_count
from slicegpt.architectures.family import Family
from slicegpt.sizing.counts import count_parameters

SHARED_FROM = 0.8  # real size / dense size from which one shared basis is used
# `--refit auto` needs this many tokens for the refit: on fewer it fits the calibration text
# too closely and the slice gets worse (SmolLM2, 25%: 2 sequences of 2048 tokens gave
# 72.64 against 66.16 without it; 16 gave 39.89 against 43.01; bench/README.md).
REFIT_MIN_TOKENS = 16 * 2048
# `--refit-share auto`: the refit reads a quarter of the calibration sequences from 0.8 x
# dense up (within 2 dense forwards at 25%) and all of them below, where it carries a deep
# cut (SmolLM2 at 0.765 x: 48.61 against 52.08 for a quarter; bench/README.md).
REFIT_SHARE_MILD, REFIT_SHARE_DEEP = 0.25, 1.0


def requested_size(model: nn.Module, family: Family, config: SliceConfig) -> int:
    """The real parameter count asked for: the budget, or the per-block layout's size at the
    sparsity where that is smaller than dense, or else (1 - sparsity) x dense."""
    block = dataclasses.replace(config, rotations="block")
    budget = parameter_budget(model, family, block)
    if budget is not None:
        return budget
    size, dense = uniform_size(model, family, block), count_parameters(model)
    if config.sparsity > 0 and size >= dense:
        return int((1.0 - config.sparsity) * dense)
    return size


def _fits(model: nn.Module, family: Family, config: SliceConfig, size: int) -> bool:
    try:
        width_for_budget(model, family, config, size)
    except SliceGPTError:
        return False
    return True


def resolve_layout(model: nn.Module, family: Family, config: SliceConfig) -> SliceConfig:
    """`config` with `widths`, `rotations`, `pca` and `refit` "auto" settled (on the dense, unfused model)."""
    config = _resolve_widths(model, family, config)
    config = _resolve_rotations(model, family, config)
    if config.refit_share is None:
        config = dataclasses.replace(config, refit_share=_auto_refit_share(_is_deep(model, family, config)))
    if config.pca == "auto":
        config = dataclasses.replace(config, pca="normalized" if config.rotations == "model" else "raw")
    if config.refit is None:
        config = dataclasses.replace(config, refit=config.rotations != "block" and shared_refit_runs(config))
    return config


def _auto_refit_share(deep: bool) -> float:
    return REFIT_SHARE_DEEP if deep else REFIT_SHARE_MILD


def _is_deep(model: nn.Module, family: Family, config: SliceConfig) -> bool:
    """Whether the sliced model (config settled) is below SHARED_FROM x dense."""
    size = parameter_budget(model, family, config) or uniform_size(model, family, config)
    return size < SHARED_FROM * count_parameters(model)


def refit_tokens(config: SliceConfig) -> int:
    """Calibration tokens the refit reads with shared bases: its leading share of the batches."""
    batches = math.ceil(config.cal_samples / config.cal_batch_size)
    kept = leading_count(batches, config.refit_share)
    return min(config.cal_samples, kept * config.cal_batch_size) * config.cal_seqlen


def _resolve_widths(model: nn.Module, family: Family, config: SliceConfig) -> SliceConfig:
    """Post-norm families slice only the embeddings where that keeps half their width or more."""
    if config.widths != "auto":
        return config
    uniform = dataclasses.replace(config, widths="uniform")
    has_post_norms = family.attn_post_norm or family.mlp_post_norm
    cuts = config.sparsity > 0 or config.target_params is not None or config.target_ratio is not None
    if not (has_post_norms and cuts) or config.rotations not in ("auto", "block") or config.refit:
        return uniform
    size = requested_size(model, family, uniform)
    embedding = dataclasses.replace(config, widths="embedding", rotations="block", target_params=size,
                                    target_ratio=None)
    try:
        width = width_for_budget(model, family, embedding, size)
    except SliceGPTError:
        return uniform
    return embedding if width >= model.config.hidden_size // 2 else uniform


def shared_refit_runs(config: SliceConfig) -> bool:
    """Whether the refit runs with a shared basis under this config (`--refit auto` settles it so)."""
    if config.refit is not None:
        return config.refit
    return config.widths != "embedding" and refit_tokens(config) >= REFIT_MIN_TOKENS


def _resolve_rotations(model: nn.Module, family: Family, config: SliceConfig) -> SliceConfig:
    if config.rotations != "auto":
        return config
    block = dataclasses.replace(config, rotations="block")
    if config.widths != "uniform":  # per-point widths need per-point bases
        return block
    size = requested_size(model, family, config)
    asked = config.target_params is not None or config.target_ratio is not None
    # The per-block layout at the sparsity would be larger than dense: a budget replaces it.
    capped = not asked and size < uniform_size(model, family, block)
    if family.attn_post_norm or family.mlp_post_norm:  # one basis broke Gemma 3 270M (bench/README.md)
        return dataclasses.replace(block, target_params=size) if capped else block
    # Without the refit, one basis cannot follow the stream through a deep cut; with it, one
    # basis won at every size measured.
    deep = size < SHARED_FROM * count_parameters(model)
    shared = dataclasses.replace(config, refit_share=config.refit_share or _auto_refit_share(deep))
    if deep and not shared_refit_runs(shared) and (not capped or _fits(model, family, block, size)):
        return dataclasses.replace(block, target_params=size) if capped else block
    if not asked:  # the same size, spent on width
        return dataclasses.replace(config, rotations="model", target_params=size)
    return dataclasses.replace(config, rotations="model")
