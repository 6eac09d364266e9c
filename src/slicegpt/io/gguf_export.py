"""Write a plain (shortcut-free) model as a GGUF file that llama.cpp runs unchanged.

Only standard families whose llama.cpp graph matches transformers' are written: Llama
and Mistral (llama.cpp's `llama` graph), Qwen2 and Qwen3. llama.cpp reads every size
from the metadata, so a sliced model is just a model with a smaller embedding length;
the head size is written explicitly because it no longer equals hidden / heads. Names,
keys and tokenizer fields come from the `gguf` package's own tables.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slicegpt.errors import SliceGPTError


@dataclass(frozen=True)
class GGUFArch:
    name: str  # gguf.MODEL_ARCH member
    # llama.cpp's `llama` graph rotates interleaved pairs, transformers rotates halves:
    # q and k rows are reordered per head so both compute the same thing.
    reorder_qk: bool


GGUF_ARCHS = {
    "LlamaForCausalLM": GGUFArch("LLAMA", reorder_qk=True),
    "MistralForCausalLM": GGUFArch("LLAMA", reorder_qk=True),
    "Qwen2ForCausalLM": GGUFArch("QWEN2", reorder_qk=False),
    "Qwen3ForCausalLM": GGUFArch("QWEN3", reorder_qk=False),
}

# Module path (inside the model, or inside one decoder layer) -> gguf.MODEL_TENSOR member.
GLOBAL_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM", "post_attention_layernorm": "FFN_NORM",
    "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K", "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT", "self_attn.q_norm": "ATTN_Q_NORM", "self_attn.k_norm": "ATTN_K_NORM",
    "mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
}
OUT_TYPES = ("f32", "f16")


def gguf_arch_for(model: nn.Module) -> GGUFArch:
    arch = type(model).__name__
    if getattr(model.config, "slicing", None) is not None:
        raise SliceGPTError("GGUF export needs a plain model; convert the sliced one first (to_plain_model)")
    if arch not in GGUF_ARCHS:
        raise SliceGPTError(f"GGUF export supports {', '.join(GGUF_ARCHS)}, not {arch}")
    return GGUF_ARCHS[arch]


def reorder_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Within each head, rows (first half, second half) -> interleaved pairs (llama.cpp's rotary order)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_tensors(model: nn.Module, arch: GGUFArch) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor (the transformers (out, in) layout, which GGUF stores as is)."""
    import gguf

    config = model.config
    member = getattr(gguf.MODEL_ARCH, arch.name)
    allowed = gguf.MODEL_TENSORS[member]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        path, _, kind = key.rpartition(".")
        if path in GLOBAL_TENSORS:
            block, local = None, path
            tensor_kind = GLOBAL_TENSORS[path]
        else:
            prefix, _, rest = path.partition("model.layers.")
            index, _, local = rest.partition(".")
            if prefix or not index.isdigit() or local not in LAYER_TENSORS:
                raise SliceGPTError(f"GGUF export: no GGUF name for {key}")
            block, tensor_kind = int(index), LAYER_TENSORS[local]
        if path == "lm_head" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        kind_member = getattr(gguf.MODEL_TENSOR, tensor_kind)
        if kind_member not in allowed:
            raise SliceGPTError(f"GGUF export: {arch.name.lower()} has no place for {key}")
        if arch.reorder_qk and local in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config.num_attention_heads if local.endswith("q_proj") else config.num_key_value_heads
            tensor = reorder_rotary_rows(tensor, heads)
        name = gguf.TENSOR_NAMES[kind_member].format(bid=block) + f".{kind}"
        out[name] = tensor
    rope_factors = llama3_rope_factors(config)
    if rope_factors is not None:
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = rope_factors
    return out


def rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {"rope_type": "default",
                                                            "rope_theta": getattr(config, "rope_theta", 10000.0)})


def llama3_rope_factors(config) -> torch.Tensor | None:
    """llama.cpp applies llama3 RoPE scaling as per-frequency divisors: default / scaled frequencies."""
    if rope_parameters(config).get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = rope_parameters(config)["rope_theta"]
    dim = head_dim(config)
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (default / scaled.double()).float()


def add_hyperparameters(writer, config, name: str) -> None:
    import gguf

    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "llama3", "linear"):
        raise SliceGPTError(f"GGUF export: RoPE scaling {rope['rope_type']!r} is not supported")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) as llama.cpp's `gpt2` tokenizer model, with the
    merges, special token ids and chat template that the gguf package reads from its files."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise SliceGPTError("GGUF export writes byte-level BPE tokenizers (GPT-2 style) only")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SliceGPTError(f"the tokenizer has ids up to {max(vocab.values())}, the model only {vocab_size} rows")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index not in added:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as files:
        tokenizer.save_pretrained(files)
        special = gguf.SpecialVocab(files, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise SliceGPTError("the tokenizer has no BPE merges to write")
        special.add_to_gguf(writer, quiet=True)


def write_gguf(model: nn.Module, tokenizer, path: str | Path, out_type: str = "f16", name: str = "model",
               tokenizer_pre: str = "default", description: str | None = None) -> Path:
    """Write `model` (a plain Llama/Mistral/Qwen2/Qwen3) and its tokenizer to one GGUF file.

    Matrices are stored as `out_type` (f32 or f16); norms, biases and RoPE factors stay f32,
    as llama.cpp expects. Written to a temporary name and renamed, so no half file is left.
    """
    import gguf

    if out_type not in OUT_TYPES:
        raise SliceGPTError(f"GGUF output type must be one of {', '.join(OUT_TYPES)}, not {out_type}")
    arch = gguf_arch_for(model)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.name)])
    try:
        add_hyperparameters(writer, model.config, name)
        file_type = gguf.LlamaFileType.ALL_F32 if out_type == "f32" else gguf.LlamaFileType.MOSTLY_F16
        writer.add_file_type(file_type)
        if description:
            writer.add_description(description)
        if tokenizer is not None:
            add_tokenizer(writer, tokenizer, model.config.vocab_size, tokenizer_pre)
        for tensor_name, tensor in gguf_tensors(model, arch).items():
            half = out_type == "f16" and tensor.dim() == 2
            writer.add_tensor(tensor_name, tensor.detach().to(torch.float16 if half else torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
