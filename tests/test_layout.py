"""--rotations auto: the size first (the paper's layout at --sparsity, or a budget), then the layout."""

import pytest

from slicegpt import SliceConfig, slice_model
from slicegpt.sizing.budget import predicted_parameters, uniform_widths
from slicegpt.architectures.families import family_for
from slicegpt.sizing.layout import REFIT_MIN_TOKENS, SHARED_FROM, refit_tokens, resolve_layout
from slicegpt.sizing.counts import count_parameters

from conftest import TINY_CONFIGS, make_tiny_model, random_batches


def _resolve(**settings):
    model = make_tiny_model("LlamaForCausalLM", tied=True)
    return model, resolve_layout(model, family_for(model), SliceConfig(**settings))


def _block_size(model, sparsity, round_to=8):
    family = family_for(model)
    config = SliceConfig(sparsity=sparsity, rotations="block", round_to=round_to)
    return predicted_parameters(model, family, config, uniform_widths(model, family, config.kept_width(64)))


def test_a_mild_cut_spends_the_per_block_size_on_one_wider_basis():
    model, config = _resolve(sparsity=0.25, round_to=1)  # (steps of 8 are too coarse at width 64)
    size = _block_size(model, 0.25, round_to=1)
    assert size >= SHARED_FROM * count_parameters(model)
    assert (config.rotations, config.target_params) == ("model", size)
    slice_model(model, None, config, random_batches(96), progress=False)
    assert count_parameters(model) <= size
    assert model.config.slicing["embedding_width"] > 48  # wider than a 25% cut of the width


def test_a_deep_cut_with_the_refit_spends_the_per_block_size_on_one_basis():
    model, config = _resolve(sparsity=0.5)  # 128 x 2048 calibration tokens: the refit runs
    size = _block_size(model, 0.5)
    assert size < SHARED_FROM * count_parameters(model)
    assert (config.rotations, config.target_params, config.refit) == ("model", size, True)
    slice_model(model, None, config, random_batches(96), progress=False)
    assert count_parameters(model) <= size


@pytest.mark.parametrize("settings", [dict(refit=False), dict(cal_samples=8)])
def test_a_deep_cut_without_the_refit_keeps_a_basis_per_block(settings):
    """Too few tokens for the refit (or --no-refit): one basis cannot follow the stream."""
    model, config = _resolve(sparsity=0.5, **settings)
    assert (config.rotations, config.target_params, config.sparsity, config.refit) == ("block", None, 0.5, False)


def test_an_explicit_refit_shares_one_basis_even_on_few_tokens():
    _, config = _resolve(sparsity=0.5, cal_samples=8, refit=True)
    assert (config.rotations, config.refit) == ("model", True)


@pytest.mark.parametrize("settings,expected", [(dict(target_ratio=0.85), "model"), (dict(target_ratio=0.6), "model"),
                                               (dict(target_ratio=0.6, refit=False), "block"),
                                               (dict(sparsity=0.25, widths="variance"), "block"),
                                               (dict(sparsity=0.25, rotations="layer"), "layer")])
def test_budgets_and_explicit_layouts(settings, expected):
    _, config = _resolve(**settings)
    assert config.rotations == expected
    assert config.target_ratio == settings.get("target_ratio")


def test_no_cut_rotates_at_full_width():
    model, config = _resolve(sparsity=0.0)
    slice_model(model, None, config, random_batches(96), progress=False)
    assert model.config.slicing["embedding_width"] == 64


@pytest.mark.parametrize("settings,expected", [(dict(sparsity=0.25), "normalized"),
                                               (dict(sparsity=0.5, refit=False), "raw"),
                                               (dict(sparsity=0.25, rotations="group:2"), "raw"),
                                               (dict(sparsity=0.5, rotations="model"), "normalized"),
                                               (dict(sparsity=0.25, pca="raw"), "raw"),
                                               (dict(sparsity=0.5, pca="normalized"), "normalized")])
def test_pca_weighting_follows_the_layout_unless_given(settings, expected):
    assert _resolve(**settings)[1].pca == expected



def test_a_sparsity_whose_per_block_size_exceeds_dense_is_capped():
    """At 12.5% of a tiny model the two shortcuts per layer outweigh the cut: the size becomes
    (1 - S) x dense, and auto spends it where it fits."""
    model, config = _resolve(sparsity=0.125)
    dense = count_parameters(model)
    assert _block_size(model, 0.125) > dense
    assert config.target_params == int(0.875 * dense) and config.rotations == "model"
    slice_model(model, None, config, random_batches(96), progress=False)
    assert count_parameters(model) <= 0.875 * dense


@pytest.mark.parametrize("sparsity", [0.125, 0.25])
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_the_default_is_smaller_than_dense_for_every_tied_family(arch, sparsity):
    model = make_tiny_model(arch, tied=True)
    dense = count_parameters(model)
    slice_model(model, None, SliceConfig(sparsity=sparsity), random_batches(96), progress=False)
    assert count_parameters(model) < dense
    assert model.config.slicing["tied_head"]


@pytest.mark.parametrize("arch", ["Gemma3ForCausalLM", "Olmo2ForCausalLM"])
@pytest.mark.parametrize("settings", [dict(sparsity=0.25, round_to=1), dict(target_ratio=0.85)])
def test_post_norm_families_keep_a_basis_per_block(arch, settings):
    """Where a Llama's size would buy one wide basis, post-norm families keep per-block bases."""
    model = make_tiny_model(arch, tied=True)
    config = resolve_layout(model, family_for(model), SliceConfig(**settings))
    assert (config.rotations, config.pca) == ("block", "raw")


def test_widths_auto_slices_only_the_embeddings_of_post_norm_families_where_half_the_width_stays():
    # A tiny Gemma 3 with a large vocabulary: the embedding dominates, as in Gemma 3 270M.
    model = make_tiny_model("Gemma3ForCausalLM", tied=True)
    model.resize_token_embeddings(4096)
    family = family_for(model)
    assert resolve_layout(model, family, SliceConfig(target_ratio=0.85)).widths == "embedding"
    # Cutting so much that the embedding would keep less than half its width: one width everywhere.
    assert resolve_layout(model, family, SliceConfig(target_ratio=0.5)).widths == "uniform"
    assert resolve_layout(model, family, SliceConfig(target_ratio=0.85, refit=True)).widths == "uniform"
    assert resolve_layout(model, family, SliceConfig(sparsity=0.0)).widths == "uniform"
    # Families without post-norms keep one width everywhere.
    llama = make_tiny_model("LlamaForCausalLM", tied=True)
    llama.resize_token_embeddings(4096)
    assert resolve_layout(llama, family_for(llama), SliceConfig(target_ratio=0.85)).widths == "uniform"


def test_refit_auto_is_on_with_shared_bases_and_enough_calibration_tokens():
    model = make_tiny_model("LlamaForCausalLM", tied=True)
    family = family_for(model)

    def refit(**settings):
        return resolve_layout(model, family, SliceConfig(sparsity=0.25, **settings)).refit

    assert refit(rotations="model") and refit(rotations="group:2")  # 128 x 2048 tokens, a quarter each
    assert not refit(rotations="block")  # a third pass beside the PCA's own
    assert not refit(rotations="model", cal_samples=8)  # 2 sequences: it would overfit them
    assert not refit(rotations="model", cal_samples=8, refit_share=1.0)  # all 8 are still too few
    assert refit(rotations="model", cal_samples=16, refit_share=1.0)
    assert refit(rotations="model", cal_samples=8, refit=True)  # asked for: done
    assert refit_tokens(SliceConfig(cal_samples=64, cal_seqlen=2048, refit_share=0.25)) == 16 * 2048 == REFIT_MIN_TOKENS


def test_the_refit_reads_every_sequence_below_0_8_x_dense_and_a_quarter_above():
    model, mild = _resolve(sparsity=0.25, round_to=1)
    _, deep = _resolve(sparsity=0.5)
    assert (mild.rotations, mild.refit_share) == ("model", 0.25)
    assert (deep.rotations, deep.refit_share) == ("model", 1.0)
    assert _resolve(sparsity=0.5, refit_share=0.5)[1].refit_share == 0.5  # given: kept
    # 16 sequences of 2048 tokens: all of them reach the refit's floor at a deep cut, where auto
    # then shares one basis; a quarter of them does not at a mild cut.
    assert _resolve(sparsity=0.5, cal_samples=16)[1].rotations == "model"
    assert _resolve(sparsity=0.25, round_to=1, cal_samples=16)[1].refit is False
