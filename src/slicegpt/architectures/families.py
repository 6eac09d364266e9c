"""What slicegpt needs to know about each model family, as data.

A family description names the modules that read from and write to the residual
stream. The algorithm (fusion, rotation, slicing) and the sliced modeling code read
these names and never mention a family by itself. Adding an architecture means adding
one `Family` entry to `FAMILIES` (see docs/adding-an-architecture.md).

All paths inside a layer are relative to the decoder layer module. A stream "input" or
"output" path names a module with a `weight` (nn.Linear, a MoE router) or a bare
parameter (a fused expert tensor); see `modeling_sliced.StreamWeight`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from slicegpt.errors import SliceGPTError
from slicegpt.architectures.modeling_sliced import branch_writers, stream_weight


@dataclass(frozen=True)
class Family:
    name: str
    # Module paths relative to the model.
    layers: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)  # token and learned-position tables
    final_norm: str = "model.norm"
    head: str = "lm_head"
    # Module paths relative to one decoder layer.
    attn: str = "self_attn"
    mlp: str | None = "mlp"
    # Where the MLP is not one module but the layer's own children applied in order (OPT).
    mlp_chain: tuple[str, ...] = ()
    attn_norm: str = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"  # None: one norm feeds both branches
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_outputs: tuple[str, ...] = ("mlp.down_proj",)
    # Norms on a branch's output, before the residual add (Gemma 2/3, OLMo-2). Their scale
    # cannot fold into a rotated weight, so fusion turns each into a bare norm over the
    # dense output followed by a map (dense -> stream width) holding the scale; that map,
    # not the branch's output projections, writes the stream (see `branch_writers`).
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # False: the branches read the stream with no norm before them (OLMo-2); fusion then puts
    # parameter-free identities at attn_norm / mlp_norm, which mark where each block reads.
    pre_norms: bool = True
    # Integer attributes inside the layer that hold the width the MLP reads (MoE routers
    # reshape their input by it), so they must follow the sliced width.
    mlp_width_attrs: tuple[str, ...] = ()
    # The MLP's output must be as wide as its input (MoE blocks allocate one from the other).
    mlp_keeps_width: bool = False
    # "rms": RMSNorm x / rms(x) * w; "layer": LayerNorm (needs a mean-free stream);
    # "rms_plus_one": RMSNorm scaled by (1 + w), as in Gemma.
    norm_kind: str = "rms"
    # Parallel blocks feed attention and MLP from the same input (Phi-2, GPT-NeoX).
    parallel: bool = False
    # A boolean config attribute that chooses parallel (True) or sequential, where one
    # family has both shapes (GPT-NeoX's use_parallel_residual). Overrides `parallel`.
    parallel_attr: str | None = None
    # The stream linears are transformers Conv1D, weight stored (in, out) (GPT-2). They
    # become nn.Linear before fusion, and the sliced model is rebuilt with nn.Linear.
    conv1d: bool = False
    # Names of the arguments the model passes a decoder layer positionally after
    # hidden_states (GPT-2 passes cache, mask and encoder states that way).
    layer_args: tuple[str, ...] = ()
    # (config attribute, required value, why): configurations the method cannot handle.
    requires: tuple[tuple[str, object, str], ...] = ()
    # (module path, why): modules whose presence means an unsupported variant.
    forbidden: tuple[tuple[str, str], ...] = ()
    # Config-dependent shapes beyond one boolean: (conditions, changes) pairs, each a tuple of
    # (name, value); where every config attribute in `conditions` has its value, the fields in
    # `changes` take theirs. The first match wins (Falcon's three block shapes, StableLM's).
    variants: tuple[tuple[tuple[tuple[str, object], ...], tuple[tuple[str, object], ...]], ...] = ()
    # A scalar attribute of the decoder layer that multiplies each branch's output before the
    # residual add (Granite's residual_multiplier); fusion folds it into the writers.
    branch_scale_attr: str | None = None
    # The model reads a decoder layer's result as `outputs[0]` (Falcon): the sliced layer returns a tuple.
    layer_returns_tuple: bool = False
    # Leading layers built another way (DeepSeek-V3's first_k_dense_replace dense MLPs before the MoE
    # ones): (config attribute holding how many, field changes for them), and that count, which
    # for_config reads from the config. `for_layer` gives one layer's description.
    leading_layers: tuple[str, tuple[tuple[str, object], ...]] | tuple[()] = ()
    leading_count: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def writers(self, part: str) -> tuple[str, ...]:
        """The weights that write branch `part` ("attn" or "mlp") into the stream after fusion."""
        return branch_writers(self.to_dict(), part)

    def for_config(self, config) -> "Family":
        """This description with config-dependent choices (block shape, norm names) made."""
        family = self
        if self.parallel_attr is not None:
            family = dataclasses.replace(family, parallel=bool(getattr(config, self.parallel_attr)))
        if self.leading_layers:
            family = dataclasses.replace(family, leading_count=int(getattr(config, self.leading_layers[0], 0) or 0))
        for conditions, changes in self.variants:
            if all(_comparable(getattr(config, attr, None)) == value for attr, value in conditions):
                return dataclasses.replace(family, **dict(changes))
        return family

    def for_layer(self, index: int) -> "Family":
        """The description of decoder layer `index` (see `leading_layers`)."""
        if index < self.leading_count:
            return dataclasses.replace(self, **dict(self.leading_layers[1]))
        return self


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


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _exists(root: nn.Module, path: str) -> bool:
    try:
        return root.get_submodule(path) is not None
    except AttributeError:
        return False


def _comparable(value):
    return tuple(value) if isinstance(value, list) else value


def check_config(model: nn.Module, family: Family) -> None:
    arch = type(model).__name__
    for attr, value, why in family.requires:
        if _comparable(getattr(model.config, attr, value)) != value:
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


NORM_KINDS = {"rms": "an RMSNorm (x / rms(x) * w)", "rms_plus_one": "an RMSNorm scaled by (1 + w)",
              "layer": "a LayerNorm"}


def norm_module_eps(norm: nn.Module) -> float | None:
    for attr in ("eps", "variance_epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def norm_scale_and_shift(norm: nn.Module, kind: str, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The affine part of a norm, as (scale, shift) in float64 (a norm without a weight scales by 1)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        size = dim if dim is not None else norm.normalized_shape[-1]
        weight = torch.ones(size, dtype=torch.float64)
    weight = weight.detach().double()
    if kind == "rms":
        return weight, None
    if kind == "rms_plus_one":
        return 1.0 + weight, None
    if kind == "layer":
        bias = getattr(norm, "bias", None)
        return weight, None if bias is None else bias.detach().double()
    raise ValueError(f"unknown norm kind {kind!r}")


@torch.no_grad()
def check_norm(norm: nn.Module, kind: str, error: SliceGPTError) -> None:
    """Probe the norm: it must compute the formula `kind` names, since that is what fusion folds."""
    eps = norm_module_eps(norm)
    weight = getattr(norm, "weight", None)
    if eps is None or (weight is not None and not isinstance(weight, torch.Tensor)):
        raise error
    if weight is not None and weight.is_meta:
        return  # no values to probe; the module checks above still apply
    dim = weight.shape[-1] if weight is not None else getattr(norm, "normalized_shape", (None,))[-1]
    if dim is None:
        raise error
    device = weight.device if weight is not None else "cpu"
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    # A non-zero mean separates LayerNorm from RMSNorm; two rows of different scale.
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    x[1] *= 3.0
    try:
        actual = norm(x.to(device, dtype)).double().cpu()
        scale, shift = norm_scale_and_shift(norm, kind, dim)
    except Exception:
        raise error from None
    centred = x - x.mean(-1, keepdim=True) if kind == "layer" else x
    expected = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * scale.cpu()
    if shift is not None:
        expected = expected + shift.cpu()
    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance):
        raise error
