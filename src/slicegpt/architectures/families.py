"""Every supported model family, as data, and the checks that a model matches its entry.

Adding an architecture means adding one `Family` (family.py) entry to `FAMILIES`
(see docs/adding-an-architecture.md).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from slicegpt.architectures.family import Family, comparable, get_module
from slicegpt.architectures.modeling_sliced import stream_weight
from slicegpt.architectures.norms import NORM_KINDS, check_norm
from slicegpt.errors import SliceGPTError


LLAMA = Family(name="llama")

# OPT: LayerNorm with bias, learned positions (the table has 2 extra rows for OPT's
# position offset; the whole table is rotated), and fc1/fc2 sitting on the layer itself.
OPT = Family(
    name="opt",
    layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    attn_outputs=("self_attn.out_proj",),
    mlp=None,
    mlp_chain=("fc1", "activation_fn", "fc2"),
    mlp_inputs=("fc1",),
    mlp_outputs=("fc2",),
    norm_kind="layer",
    requires=(("do_layer_norm_before", True,
               "post-LN is not supported (OPT with do_layer_norm_before=False, e.g. opt-350m, normalises "
               "after the residual add, so the stream cannot be rotated)"),),
    forbidden=(("model.decoder.project_in", "embeddings narrower than the residual stream "
                "(word_embed_proj_dim != hidden_size, project_in/project_out) are not supported"),
               ("model.decoder.project_out", "project_in/project_out (word_embed_proj_dim != hidden_size) "
                "are not supported")),
)

# Phi-2: one LayerNorm feeds attention and MLP in parallel; biases everywhere, head included.
PHI = Family(
    name="phi",
    final_norm="model.final_layernorm",
    mlp_norm=None,
    attn_outputs=("self_attn.dense",),
    mlp_inputs=("mlp.fc1",),
    mlp_outputs=("mlp.fc2",),
    norm_kind="layer",
    parallel=True,
)

GPT_NEOX = Family(
    name="gpt_neox",
    layers="gpt_neox.layers",
    embeddings=("gpt_neox.embed_in",),
    final_norm="gpt_neox.final_layer_norm",
    attn="attention",
    attn_inputs=("attention.query_key_value",),
    attn_outputs=("attention.dense",),
    mlp_inputs=("mlp.dense_h_to_4h",),
    mlp_outputs=("mlp.dense_4h_to_h",),
    norm_kind="layer",
    parallel_attr="use_parallel_residual",
)

GPT2 = Family(
    name="gpt2",
    layers="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    attn="attn",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    attn_inputs=("attn.c_attn",),
    attn_outputs=("attn.c_proj",),
    mlp_inputs=("mlp.c_fc",),
    mlp_outputs=("mlp.c_proj",),
    norm_kind="layer",
    conv1d=True,
    layer_args=("cache", "attention_mask", "encoder_hidden_states"),
    requires=(("add_cross_attention", False, "cross-attention blocks are not supported"),),
)

# MoE: the router and every expert read the normalised stream; every expert writes it.
# Experts are fused 3D parameters (experts, out, in) in transformers 5.
MIXTRAL = dataclasses.replace(
    LLAMA,
    name="mixtral",
    mlp_inputs=("mlp.gate", "mlp.experts.gate_up_proj"),
    mlp_outputs=("mlp.experts.down_proj",),
    mlp_width_attrs=("mlp.gate.hidden_dim", "mlp.experts.hidden_dim"),
    mlp_keeps_width=True,
)
_ALL_SPARSE = (
    ("mlp_only_layers", (), "dense MLP layers among the MoE layers (mlp_only_layers) are not supported"),
    ("decoder_sparse_step", 1, "dense MLP layers among the MoE layers (decoder_sparse_step > 1) are not supported"),
)
QWEN3_MOE = dataclasses.replace(MIXTRAL, name="qwen3_moe", requires=_ALL_SPARSE)
# Qwen2-MoE adds a shared expert, and a one-output gate on it that also reads the stream.
QWEN2_MOE = dataclasses.replace(
    QWEN3_MOE,
    name="qwen2_moe",
    mlp_inputs=("mlp.gate", "mlp.experts.gate_up_proj", "mlp.shared_expert.gate_proj",
                "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"),
    mlp_outputs=("mlp.experts.down_proj", "mlp.shared_expert.down_proj"),
)

# --- Recent families: SmolLM3, Granite, Cohere, StableLM, Falcon, GPT-J, DeepSeek-V3, gpt-oss ---

# Cohere: one LayerNorm without a bias feeds attention and MLP in parallel; logit_scale multiplies
# the logits (a scalar after the head).
COHERE = Family(name="cohere", mlp_norm=None, norm_kind="layer", parallel=True)

# StableLM: LayerNorm; sequential, or parallel with one norm where use_parallel_residual.
STABLELM = Family(
    name="stablelm",
    norm_kind="layer",
    variants=(((("use_parallel_residual", True),), (("parallel", True), ("mlp_norm", None))),),
)

# Falcon: parallel with one norm (7B, Falcon2-11B with num_ln_in_parallel_attn=1), parallel with two
# (new_decoder_architecture: 40B, 180B), or sequential (parallel_attn=False: RW-1B). ALiBi biases the
# attention scores from positions alone, so it never sees the stream. The model reads outputs[0].
FALCON = Family(
    name="falcon",
    layers="transformer.h",
    embeddings=("transformer.word_embeddings",),
    final_norm="transformer.ln_f",
    attn="self_attention",
    mlp_norm=None,
    attn_inputs=("self_attention.query_key_value",),
    attn_outputs=("self_attention.dense",),
    mlp_inputs=("mlp.dense_h_to_4h",),
    mlp_outputs=("mlp.dense_4h_to_h",),
    norm_kind="layer",
    parallel=True,
    layer_returns_tuple=True,
    variants=(
        ((("new_decoder_architecture", True), ("num_ln_in_parallel_attn", 1)), ()),
        ((("new_decoder_architecture", True),), (("attn_norm", "ln_attn"), ("mlp_norm", "ln_mlp"))),
        ((("parallel_attn", False),), (("parallel", False), ("mlp_norm", "post_attention_layernorm"))),
    ),
)

# GPT-J: one LayerNorm, attention and MLP in parallel; the head has a bias.
GPTJ = Family(
    name="gptj",
    layers="transformer.h",
    embeddings=("transformer.wte",),
    final_norm="transformer.ln_f",
    attn="attn",
    attn_norm="ln_1",
    mlp_norm=None,
    attn_inputs=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    attn_outputs=("attn.out_proj",),
    mlp_inputs=("mlp.fc_in",),
    mlp_outputs=("mlp.fc_out",),
    norm_kind="layer",
    parallel=True,
)

# DeepSeek-V3: multi-head latent attention reads the stream through its low-rank q and kv
# projections (q_proj where q_lora_rank is None, as in V2-Lite); the MoE router, experts and
# shared experts read it, experts and shared experts write it. The first first_k_dense_replace
# layers have a dense gate/up/down MLP instead.
DEEPSEEK_V3 = dataclasses.replace(
    LLAMA,
    name="deepseek_v3",
    attn_inputs=("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    mlp_inputs=("mlp.gate", "mlp.experts.gate_up_proj", "mlp.shared_experts.gate_proj",
                "mlp.shared_experts.up_proj"),
    mlp_outputs=("mlp.experts.down_proj", "mlp.shared_experts.down_proj"),
    mlp_width_attrs=("mlp.gate.hidden_dim", "mlp.experts.hidden_dim"),
    mlp_keeps_width=True,
    leading_layers=("first_k_dense_replace", (("mlp_inputs", ("mlp.gate_proj", "mlp.up_proj")),
                                              ("mlp_outputs", ("mlp.down_proj",)), ("mlp_width_attrs", ()))),
    variants=(((("q_lora_rank", None),), (("attn_inputs", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),)),),
)

# gpt-oss: a router with a bias, experts with biases stored (experts, in, out) (their module says
# is_transposed, which stream_weight reads); attention sinks are per-head logits inside attention.
GPT_OSS = dataclasses.replace(
    LLAMA,
    name="gpt_oss",
    mlp_inputs=("mlp.router", "mlp.experts.gate_up_proj"),
    mlp_outputs=("mlp.experts.down_proj",),
    mlp_width_attrs=("mlp.router.hidden_dim", "mlp.experts.hidden_size"),
    mlp_keeps_width=True,
)

RECENT_FAMILIES: dict[str, Family] = {
    # SmolLM3: Llama's shape; the layers without rotary differ inside attention only.
    "SmolLM3ForCausalLM": dataclasses.replace(LLAMA, name="smollm3"),
    # Granite: embedding_multiplier and logits_scaling are scalars outside the layers (they commute
    # with the rotation); residual_multiplier scales each branch inside the layer: folded into the writers.
    "GraniteForCausalLM": dataclasses.replace(LLAMA, name="granite", branch_scale_attr="residual_multiplier"),
    "CohereForCausalLM": COHERE,
    "StableLmForCausalLM": STABLELM,
    "FalconForCausalLM": FALCON,
    "GPTJForCausalLM": GPTJ,
    "DeepseekV3ForCausalLM": DEEPSEEK_V3,
    "GptOssForCausalLM": GPT_OSS,
}

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": dataclasses.replace(LLAMA, name="mistral"),
    # Qwen2 adds biases to q/k/v: they read the normalised stream and need no change.
    "Qwen2ForCausalLM": dataclasses.replace(LLAMA, name="qwen2"),
    # Qwen3's q/k norms act per head, inside attention, so the rotation never sees them.
    "Qwen3ForCausalLM": dataclasses.replace(LLAMA, name="qwen3"),
    "OPTForCausalLM": OPT,
    "PhiForCausalLM": PHI,
    # Phi-3: fused qkv_proj and gate_up_proj, otherwise Llama's shape.
    "Phi3ForCausalLM": dataclasses.replace(LLAMA, name="phi3", attn_inputs=("self_attn.qkv_proj",),
                                           mlp_inputs=("mlp.gate_up_proj",)),
    "GPTNeoXForCausalLM": GPT_NEOX,
    "GPT2LMHeadModel": GPT2,
    # Gemma: (1 + w) norms; its sqrt(hidden) embedding scale is a scalar, so it commutes with Q.
    "GemmaForCausalLM": dataclasses.replace(LLAMA, name="gemma", norm_kind="rms_plus_one"),
    "MixtralForCausalLM": MIXTRAL,
    "Qwen2MoeForCausalLM": QWEN2_MOE,
    "Qwen3MoeForCausalLM": QWEN3_MOE,
    **RECENT_FAMILIES,
}

# Gemma 2/3: (1 + w) norms before and after each branch ("sandwich"). Sliding-window and
# global layers, attention and final-logit soft-capping, q/k norms (Gemma 3) and the scalar
# embedding scale all act off the stream or commute with the rotation.
GEMMA2 = dataclasses.replace(LLAMA, name="gemma2", norm_kind="rms_plus_one", mlp_norm="pre_feedforward_layernorm",
                             attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm")
# OLMo-2: no norms before the branches, RMSNorms after them (the same maps as Gemma's);
# its q/k norms act on the q/k projections' outputs, inside attention.
FAMILIES.update({
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": dataclasses.replace(GEMMA2, name="gemma3"),
    "Olmo2ForCausalLM": dataclasses.replace(LLAMA, name="olmo2", attn_norm="attn_input", mlp_norm="mlp_input",
                                            pre_norms=False, attn_post_norm="post_attention_layernorm",
                                            mlp_post_norm="post_feedforward_layernorm"),
})

# Architectures refused on purpose, with the reason.
UNSUPPORTED: dict[str, str] = {
    "Gemma3ForConditionalGeneration": "is a vision-language model; slice its text model (Gemma3ForCausalLM)",
}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def family_for(model: nn.Module) -> Family:
    """The family description for `model`, checked against its config and module tree."""
    arch = type(model).__name__
    if arch in UNSUPPORTED:
        raise SliceGPTError(f"{arch} is not supported: it {UNSUPPORTED[arch]}")
    family = FAMILIES.get(arch)
    if family is None:
        raise SliceGPTError(
            f"architecture {arch} is not supported; supported: {', '.join(supported_architectures())}"
        )
    check_config(model, family)
    family = family.for_config(model.config)
    check_structure(model, family)
    return family


def family_of_sliced(model: nn.Module) -> Family:
    """The description of the family a sliced checkpoint was made from (its config names the base class)."""
    base = model.config.slicing["base_architecture"]
    if base not in FAMILIES:
        raise SliceGPTError(f"{base} is not a supported architecture")
    return FAMILIES[base].for_config(model.config)


def _exists(root: nn.Module, path: str) -> bool:
    try:
        return root.get_submodule(path) is not None
    except AttributeError:
        return False


def check_config(model: nn.Module, family: Family) -> None:
    arch = type(model).__name__
    for attr, value, why in family.requires:
        if comparable(getattr(model.config, attr, value)) != value:
            raise SliceGPTError(f"{arch} with {attr}={getattr(model.config, attr)!r}: {why}")
    if family.parallel_attr and not hasattr(model.config, family.parallel_attr):
        raise SliceGPTError(f"{arch}'s config has no '{family.parallel_attr}', which picks its block shape")


def check_structure(model: nn.Module, family: Family) -> None:
    """Fail before any work if a module the description names is missing or a norm is unexpected."""
    arch = type(model).__name__

    def mismatch(what: str, where: str) -> SliceGPTError:
        return SliceGPTError(f"{arch} does not match the '{family.name}' family description: {what} in {where}")

    def require(root: nn.Module, path: str, where: str) -> None:
        if not _exists(root, path):
            raise mismatch(f"module '{path}' not found", where)

    dense = model.config.hidden_size

    def require_weight(root: nn.Module, path: str, where: str, reads: bool) -> None:
        try:
            target = stream_weight(root, path)
        except AttributeError:
            raise mismatch(f"module or parameter '{path}' not found", where) from None
        weight = target.weight
        # Readers hold the stream on the last axis, writers on the second-to-last (Conv1D: reversed).
        transposed = family.conv1d and type(target.owner).__name__ == "Conv1D"
        axis = -1 if reads != transposed else -2
        if weight.dim() < 2 or weight.shape[axis] != dense:
            raise mismatch(f"'{path}' has shape {tuple(weight.shape)}, not the residual width {dense} on the "
                           f"axis where a stream {'reader' if reads else 'writer'} holds it", where)

    for path, why in family.forbidden:
        if _exists(model, path):
            raise SliceGPTError(f"{arch} has '{path}': {why}")
    for path in (family.layers, *family.embeddings, family.final_norm):
        require(model, path, "the model")
    for path in (*family.embeddings, family.head):
        require_weight(model, path, "the model", reads=True)
    final_norm = get_module(model, family.final_norm)
    check_norm(final_norm, family.norm_kind, mismatch(
        f"norm '{family.final_norm}' is a {type(final_norm).__name__}, not {NORM_KINDS[family.norm_kind]}",
        "the model"))
    for index, layer in enumerate(get_module(model, family.layers)):
        layer_family = family.for_layer(index)
        where = f"layer {index}"
        pre_norms = (layer_family.attn_norm, layer_family.mlp_norm) if layer_family.pre_norms else ()
        modules = [layer_family.attn, layer_family.mlp, *pre_norms, layer_family.attn_post_norm,
                   layer_family.mlp_post_norm, *layer_family.mlp_chain]
        for path in filter(None, modules):
            require(layer, path, where)
        for path in (*layer_family.attn_inputs, *layer_family.mlp_inputs):
            require_weight(layer, path, where, reads=True)
        for path in (*layer_family.attn_outputs, *layer_family.mlp_outputs):
            require_weight(layer, path, where, reads=False)
        scale = getattr(layer, layer_family.branch_scale_attr, None) if layer_family.branch_scale_attr else 1.0
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise mismatch(f"scalar attribute '{layer_family.branch_scale_attr}' not found", where)
        for path in layer_family.mlp_width_attrs:
            parent, _, name = path.rpartition(".")
            if not _exists(layer, parent) or not isinstance(getattr(get_module(layer, parent), name, None), int):
                raise mismatch(f"integer attribute '{path}' not found", where)
        for path in filter(None, (*pre_norms, layer_family.attn_post_norm, layer_family.mlp_post_norm)):
            norm = get_module(layer, path)
            check_norm(norm, layer_family.norm_kind, mismatch(
                f"norm '{path}' is a {type(norm).__name__}, not {NORM_KINDS[layer_family.norm_kind]}", where))
