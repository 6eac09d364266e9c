"""Bad input fails before any work, and says which module, norm or setting is the problem."""

import pytest
import torch
import transformers
from torch import nn

from slicegpt import SliceConfig, SliceGPTError, slice_model
from slicegpt.architectures.families import family_for

from conftest import TINY_CONFIGS, architecture_class, make_tiny_model, random_batches


def _tiny(arch, **overrides):
    config = TINY_CONFIGS[arch](False)
    for key, value in overrides.items():
        setattr(config, key, value)
    return architecture_class(arch)(config).eval()


def _fails_before_any_work(model, match):
    """slice_model raises a SliceGPTError matching `match` and leaves every weight untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SliceGPTError, match=match):
        slice_model(model, None, SliceConfig(sparsity=0.25), random_batches(96), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_renamed_module_is_named():
    model = make_tiny_model("Phi3ForCausalLM")
    attn = model.model.layers[1].self_attn
    attn.fused_qkv = attn.qkv_proj
    del attn.qkv_proj
    _fails_before_any_work(model, r"'self_attn\.qkv_proj' not found in layer 1")


def test_missing_expert_tensor_is_named():
    model = make_tiny_model("MixtralForCausalLM")
    del model.model.layers[0].mlp.experts.down_proj
    _fails_before_any_work(model, r"'mlp\.experts\.down_proj' not found in layer 0")


def test_transposed_expert_layout_is_refused():
    """Fused experts stored (experts, in, out), as some models do, would rotate along the wrong axis."""
    model = make_tiny_model("Qwen3MoeForCausalLM")
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())
    _fails_before_any_work(model, r"'mlp\.experts\.down_proj' has shape \(4, 32, 64\), not the residual width 64")


def test_missing_final_norm_is_named():
    model = _tiny("OPTForCausalLM", _remove_final_layer_norm=True)
    _fails_before_any_work(model, r"'model\.decoder\.final_layer_norm' not found in the model")


def test_unexpected_norm_type_is_named():
    model = make_tiny_model("LlamaForCausalLM")
    model.model.layers[1].post_attention_layernorm = nn.LayerNorm(64, eps=1e-5)
    _fails_before_any_work(model, r"norm 'post_attention_layernorm' is a LayerNorm, not an RMSNorm .* in layer 1")


def test_norm_that_computes_another_formula_is_refused():
    """Gemma's norms scale by (1 + w): a plain-scale RMSNorm in its place would fold wrongly."""
    model = make_tiny_model("GemmaForCausalLM")
    model.model.norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-6)
    _fails_before_any_work(model, r"norm 'model\.norm' is a LlamaRMSNorm, not an RMSNorm scaled by \(1 \+ w\)")


def test_layer_norm_where_rms_expected_is_refused():
    model = make_tiny_model("GPT2LMHeadModel")
    model.transformer.h[0].ln_2 = transformers.models.llama.modeling_llama.LlamaRMSNorm(64)
    _fails_before_any_work(model, r"norm 'ln_2' is a LlamaRMSNorm, not a LayerNorm in layer 0")


def test_opt_post_ln_is_refused():
    _fails_before_any_work(_tiny("OPTForCausalLM", do_layer_norm_before=False), "post-LN is not supported")


def test_opt_projected_embeddings_are_refused():
    config = TINY_CONFIGS["OPTForCausalLM"](False)
    config.word_embed_proj_dim = 32
    model = transformers.OPTForCausalLM(config).eval()
    _fails_before_any_work(model, r"project_in.*not supported")


def test_gpt2_cross_attention_is_refused():
    _fails_before_any_work(_tiny("GPT2LMHeadModel", add_cross_attention=True), "cross-attention")


def test_moe_with_dense_layers_is_refused():
    _fails_before_any_work(_tiny("Qwen2MoeForCausalLM", mlp_only_layers=[1]), "mlp_only_layers")


def test_gemma3_vision_language_model_is_refused():
    class Gemma3ForConditionalGeneration(nn.Module):  # stands in for the real class (slow to build)
        pass

    with pytest.raises(SliceGPTError, match="vision-language model; slice its text model"):
        family_for(Gemma3ForConditionalGeneration())


def test_post_norm_of_another_formula_is_refused():
    """A post-norm's scale becomes a map: it too must compute the (1 + w) formula the family names."""
    model = _tiny("Gemma3ForCausalLM")
    layer = model.model.layers[1]
    layer.post_feedforward_layernorm = transformers.models.llama.modeling_llama.LlamaRMSNorm(64)
    _fails_before_any_work(model, r"norm 'post_feedforward_layernorm' is a LlamaRMSNorm, not an RMSNorm scaled by \(1 \+ w\) in layer 1")


def test_deepseek_v3_dense_first_layers_have_their_own_description():
    family = family_for(make_tiny_model("DeepseekV3ForCausalLM"))  # first_k_dense_replace=1
    assert family.for_layer(0).mlp_inputs == ("mlp.gate_proj", "mlp.up_proj")
    assert family.for_layer(1).mlp_inputs[:2] == ("mlp.gate", "mlp.experts.gate_up_proj")
    assert family_for(make_tiny_model("DeepseekV3ForCausalLM:q_proj")).for_layer(0) == \
        family_for(make_tiny_model("DeepseekV3ForCausalLM:q_proj")).for_layer(1)


def test_deepseek_v3_layer_unlike_its_description_is_named():
    model = make_tiny_model("DeepseekV3ForCausalLM")
    model.model.layers[1].mlp = model.model.layers[0].mlp  # a dense MLP where the config says MoE
    _fails_before_any_work(model, r"'mlp\.gate' not found in layer 1")


def test_granite_layer_without_its_residual_multiplier_is_named():
    model = make_tiny_model("GraniteForCausalLM")
    del model.model.layers[1].residual_multiplier
    _fails_before_any_work(model, r"scalar attribute 'residual_multiplier' not found in layer 1")


@pytest.mark.parametrize("arch,parallel,norms", [
    ("FalconForCausalLM", True, ("input_layernorm", None)),
    ("FalconForCausalLM:two_norms", True, ("ln_attn", "ln_mlp")),
    ("FalconForCausalLM:new_one_norm", True, ("input_layernorm", None)),
    ("FalconForCausalLM:sequential", False, ("input_layernorm", "post_attention_layernorm")),
    ("StableLmForCausalLM", False, ("input_layernorm", "post_attention_layernorm")),
    ("StableLmForCausalLM:parallel", True, ("input_layernorm", None)),
    ("DeepseekV3ForCausalLM", False, ("input_layernorm", "post_attention_layernorm")),
])
def test_config_variants_pick_block_shape_and_norms(arch, parallel, norms):
    family = family_for(make_tiny_model(arch))
    assert (family.parallel, (family.attn_norm, family.mlp_norm)) == (parallel, norms)


def test_deepseek_v3_without_q_lora_reads_the_stream_with_q_proj():
    assert family_for(make_tiny_model("DeepseekV3ForCausalLM:q_proj")).attn_inputs[0] == "self_attn.q_proj"
    assert family_for(make_tiny_model("DeepseekV3ForCausalLM")).attn_inputs[0] == "self_attn.q_a_proj"


def test_unknown_architecture_lists_the_supported_ones():
    class ToyForCausalLM(nn.Module):
        pass

    with pytest.raises(SliceGPTError, match="ToyForCausalLM is not supported; supported: .*GPT2LMHeadModel"):
        family_for(ToyForCausalLM())
