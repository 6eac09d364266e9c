"""A sliced Llama, Mistral or Qwen2 checkpoint as a vLLM model, built from vLLM's own layers.

The sliced architecture (architectures/modeling_sliced.py has the reference forward) is the
original one with three changes, all recorded in `config.slicing`:
  * the norms have no scale and still divide by the dense width: over a kept width w of a
    dense width D that is an RMSNorm with epsilon eps * D / w and a constant gain sqrt(D / w),
    which is vLLM's RMSNorm with its weight filled with that gain;
  * every weight that reads or writes the residual stream is narrower, and the widths may
    change from block to block (`slicing["layers"][i]`: "in", "mid", "out");
  * where the blocks on either side of a residual path use different bases, the path carries
    a shortcut matrix: x_next = x S^T + branch(x). A path listed in "no_shortcut" is the
    identity. A head tied to the embeddings reads the stream through a small map after the
    final norm (checkpoint key `model.norm.map.weight`).

Tensor parallelism works as for vLLM's Llama: the projections are vLLM's column- and
row-parallel linears (the row-parallel ones all-reduce, so the stream stays whole on every
rank), and the shortcuts and the final map, a few width-by-width matrices, are replicated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from slicegpt.vllm_plugin import BASE_ARCHITECTURES

# The checkpoint's separate projections, loaded as shards of vLLM's fused ones.
STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))

# What the families handled here must look like in `slicing["family"]`: Llama's module names,
# pre-norms, no post-norms, sequential blocks.
LLAMA_SHAPE = {"layers": "model.layers", "embeddings": ["model.embed_tokens"], "final_norm": "model.norm",
               "head": "lm_head", "attn": "self_attn", "attn_norm": "input_layernorm",
               "mlp_norm": "post_attention_layernorm", "mlp": "mlp", "parallel": False}


def check_slicing(config) -> dict:
    """The config's `slicing`, or a clear error for a checkpoint this model cannot run."""
    slicing = getattr(config, "slicing", None)
    if slicing is None:
        raise ValueError("not a sliced checkpoint (config.json has no 'slicing'); a plain model needs no plugin")
    base = slicing.get("base_architecture")
    if base not in BASE_ARCHITECTURES:
        raise ValueError(f"slicegpt's vLLM plugin runs {', '.join(BASE_ARCHITECTURES)}, not {base}")
    family = slicing["family"]
    for key, expected in LLAMA_SHAPE.items():
        value = family.get(key)
        if (list(value) if isinstance(value, (list, tuple)) else value) != expected:
            raise ValueError(f"sliced family field {key}={value!r}, expected {expected!r}")
    if family.get("attn_post_norm") or family.get("mlp_post_norm") or not family.get("pre_norms", True):
        raise ValueError("slicegpt's vLLM plugin does not run branch post-norms")
    if slicing.get("mean_axis") or slicing.get("added_biases") or slicing.get("final_map_bias"):
        raise ValueError("slicegpt's vLLM plugin runs RMSNorm models only")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported activation {config.hidden_act}")
    return slicing


def dense_width_norm(width: int, dense: int, eps: float) -> RMSNorm:
    """vLLM's RMSNorm computing slicegpt's SlicedRMSNorm; its weight is the constant gain,
    which load_weights fills (the checkpoint has no norm weights)."""
    norm = RMSNorm(width, eps=eps * dense / width)
    norm.dense_gain = (dense / width) ** 0.5
    return norm


class SlicedAttention(nn.Module):
    """Grouped-query attention that reads the stream at one width and writes it at another."""

    def __init__(self, config, in_width: int, out_width: int, head_dim: int, sliding_window: int | None,
                 cache_config, quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", heads)
        assert heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)
        self.num_heads, self.num_kv_heads = heads // tp, max(1, kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        if config.model_type == "qwen2":  # Qwen2: biases on q, k, v only
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(in_width, head_dim, heads, kv_heads, bias=qkv_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * head_dim, out_width, bias=o_bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.attn = Attention(self.num_heads, head_dim, head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config,
                              per_layer_sliding_window=sliding_window, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class SlicedMLP(nn.Module):
    """The gated SiLU MLP, reading the stream at one width and writing it at another."""

    def __init__(self, in_width: int, out_width: int, intermediate: int, bias: bool, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(in_width, [intermediate] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate, out_width, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


def shortcut(in_width: int, out_width: int, absent: bool, prefix: str) -> ReplicatedLinear | None:
    return None if absent else ReplicatedLinear(in_width, out_width, bias=False, prefix=prefix)


def sliding_window_of(config, index: int) -> int | None:
    """The layer's attention window, read as vLLM's own Llama reads it (`layer_types`)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[index] == "sliding_attention":
        return config.sliding_window
    return None


class SlicedDecoderLayer(nn.Module):
    """attention then MLP, each a pre-norm branch whose residual path may carry a shortcut."""

    def __init__(self, vllm_config: VllmConfig, index: int, widths: dict, head_dim: int, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        dense, eps = config.slicing["dense_hidden_size"], config.slicing["norm_eps"]
        w_in, w_mid, w_out = widths["in"], widths.get("mid", widths["in"]), widths["out"]
        absent = set(widths.get("no_shortcut", ()))
        self.input_layernorm = dense_width_norm(w_in, dense, eps)
        self.self_attn = SlicedAttention(config, w_in, w_mid, head_dim, sliding_window_of(config, index),
                                         vllm_config.cache_config, vllm_config.quant_config, f"{prefix}.self_attn")
        self.attn_shortcut = shortcut(w_in, w_mid, "attn" in absent, f"{prefix}.attn_shortcut")
        self.post_attention_layernorm = dense_width_norm(w_mid, dense, eps)
        self.mlp = SlicedMLP(w_mid, w_out, config.intermediate_size, bool(getattr(config, "mlp_bias", False)),
                             vllm_config.quant_config, f"{prefix}.mlp")
        self.mlp_shortcut = shortcut(w_mid, w_out, "mlp" in absent, f"{prefix}.mlp_shortcut")

    @staticmethod
    def through(path: ReplicatedLinear | None, x: torch.Tensor) -> torch.Tensor:
        """The stream carried across a residual path: x S^T, or x itself."""
        if path is None:
            return x
        mapped, _ = path(x)
        return mapped

    def forward(self, positions: torch.Tensor, h: torch.Tensor,
                stream: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """As vLLM's Llama layer: the last branch's output `h` is added to the stream inside the
        next norm (one fused kernel), so the layer takes and returns (branch output, stream);
        a shortcut maps the stream before the branch's output joins it."""
        if stream is None:  # the first layer: h is the embeddings
            stream, h = h, self.input_layernorm(h)
        else:
            h, stream = self.input_layernorm(h, stream)
        h = self.self_attn(positions, h)
        h, stream = self.post_attention_layernorm(h, self.through(self.attn_shortcut, stream))
        return self.mlp(h), self.through(self.mlp_shortcut, stream)


class SlicedFinalNorm(nn.Module):
    """The final norm; with a tied head, then the map from the last width to the embeddings'."""

    def __init__(self, width: int, dense: int, eps: float, embedding_width: int | None):
        super().__init__()
        self.norm = dense_width_norm(width, dense, eps)
        self.map = None if embedding_width is None else ReplicatedLinear(width, embedding_width, bias=False,
                                                                         prefix="model.norm.map")

    def forward(self, h: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        x, _ = self.norm(h, stream)
        if self.map is not None:
            x, _ = self.map(x)
        return x


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class SlicedModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        slicing = check_slicing(config)
        dense = slicing["dense_hidden_size"]
        head_dim = getattr(config, "head_dim", None) or dense // config.num_attention_heads
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, slicing["embedding_width"],
                                                   quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(
            SlicedDecoderLayer(vllm_config, index, widths, head_dim, prefix=f"{prefix}.layers.{index}")
            for index, widths in enumerate(slicing["layers"]))
        tied = bool(slicing.get("tied_head"))
        self.norm = SlicedFinalNorm(slicing["head_in"], dense, slicing["norm_eps"],
                                    slicing["embedding_width"] if tied else None)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        stream = None
        for layer in self.layers:
            h, stream = layer(positions, h, stream)
        return self.norm(h, stream)


class SlicedForCausalLM(nn.Module):
    """The model vLLM builds for a sliced checkpoint's `Sliced<Family>ForCausalLM`."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        slicing = check_slicing(config)
        self.tied = bool(slicing.get("tied_head"))
        self.model = SlicedModel(vllm_config=vllm_config, prefix="model")
        head_width = slicing["embedding_width"] if self.tied else slicing["head_in"]
        self.lm_head = ParallelLMHead(config.vocab_size, head_width, quant_config=vllm_config.quant_config,
                                      prefix="lm_head")
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb." in name or (self.tied and name == "lm_head.weight"):
                continue
            for fused, part, shard in STACKED:
                if part in name:
                    name = name.replace(part, fused)
                    param = params[name]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        # The norms' weights are constants of the widths, not stored in the checkpoint.
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm) and hasattr(module, "dense_gain"):
                with torch.no_grad():
                    module.weight.fill_(module.dense_gain)
                loaded.add(f"{name}.weight")
        return loaded
