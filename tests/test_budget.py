"""Size-aware slicing: predicted counts are exact and budgets are met tightly."""

import pytest

from slicegpt import SliceConfig, SliceGPTError, slice_model
from slicegpt.sizing.budget import predicted_parameters, uniform_widths, width_for_budget
from slicegpt.architectures.families import family_for
from slicegpt.sizing.counts import count_parameters

from conftest import make_tiny_model, random_batches


@pytest.mark.parametrize("rotations", ["block", "layer", "model"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM"])  # post-norm maps
def test_predicted_count_matches_the_sliced_model(arch, rotations, tied):
    model = make_tiny_model(arch, tied=tied)
    family = family_for(model)
    config = SliceConfig(sparsity=0.25, rotations=rotations)
    predicted = predicted_parameters(model, family, config, uniform_widths(model, family, 48))
    slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    assert count_parameters(model) == predicted


@pytest.mark.parametrize("rotations", ["block", "model"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["OPTForCausalLM", "GPT2LMHeadModel", "PhiForCausalLM", "CohereForCausalLM",
                                  "StableLmForCausalLM", "FalconForCausalLM:sequential", "GPTJForCausalLM"])
def test_predicted_count_matches_for_layernorm_families(arch, tied, rotations):
    """Counted with the final map's bias (tied) or the bias the untied head gains from the final norm."""
    model = make_tiny_model(arch, tied=tied)
    family = family_for(model)
    config = SliceConfig(sparsity=0.25, rotations=rotations)
    predicted = predicted_parameters(model, family, config, uniform_widths(model, family, 48))
    slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    assert count_parameters(model) == predicted
    assert model.config.slicing["tied_head"] == tied


@pytest.mark.parametrize("ratio", [0.6, 0.85])
def test_target_ratio_is_met_by_the_widest_width(ratio):
    model = make_tiny_model("LlamaForCausalLM", tied=True)
    family = family_for(model)
    dense = count_parameters(model)
    config = SliceConfig(target_ratio=ratio)
    width = width_for_budget(model, family, config, int(ratio * dense))
    wider = predicted_parameters(model, family, config, uniform_widths(model, family, width + config.round_to))
    assert wider > ratio * dense
    slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    assert count_parameters(model) <= ratio * dense
    assert model.get_input_embeddings().weight.shape[1] == width


def test_impossible_budget_is_refused():
    model = make_tiny_model("LlamaForCausalLM")
    with pytest.raises(SliceGPTError, match="no width meets the budget"):
        width_for_budget(model, family_for(model), SliceConfig(), 1000)
    with pytest.raises(SliceGPTError, match="not both"):
        SliceConfig(target_params=10, target_ratio=0.5)


@pytest.mark.parametrize("rotations", ["block", "layer"])
def test_variance_schedule_keeps_the_uniform_size(rotations):
    uniform = make_tiny_model("LlamaForCausalLM", tied=True, seed=3)
    varied = make_tiny_model("LlamaForCausalLM", tied=True, seed=3)
    batches = random_batches(uniform.config.vocab_size)
    slice_model(uniform, None, SliceConfig(sparsity=0.25, rotations=rotations), batches, progress=False)
    result = slice_model(varied, None, SliceConfig(sparsity=0.25, rotations=rotations, widths="variance"),
                         batches, progress=False)
    assert count_parameters(varied) <= count_parameters(uniform)
    assert all(point.width % 8 == 0 for point in result.points)
    if rotations == "layer":  # a shortcut on each later layer's attention skip path; layer 0 shares the embeddings'
        assert result.layer_widths[0].get("no_shortcut") == ["attn", "mlp"]
        assert all(w.get("no_shortcut") == ["mlp"] for w in result.layer_widths[1:])


def test_variance_widths_follow_the_spectrum():
    import torch

    from slicegpt.sizing.schedule import width_for_fraction

    steep = torch.tensor([100.0, 10.0, 1.0, 0.1] + [0.01] * 60)
    flat = torch.ones(64)
    assert width_for_fraction(steep, 0.9, 8) == 8
    assert width_for_fraction(flat, 0.9, 8) == 64
    assert width_for_fraction(flat, 0.5, 8) == 32
