""".gguf files of the supported families that transformers can de-quantise load, and slice.

Tiny GGUF files are written here with the `gguf` package: random tiny models, tensor names
from gguf's own name map, and a byte-level BPE tokenizer of 258 tokens (the 256 bytes, one
merge, an end-of-text token).
"""

import pytest
import torch
import transformers

from slicegpt import SliceConfig, slice_model
from slicegpt.architectures.families import family_for

from conftest import random_batches

gguf = pytest.importorskip("gguf")

_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
# GGUF architecture[:variant] -> (transformers class, config): shapes transformers' GGUF loader reads back.
GGUF_MODELS = {
    "stablelm": (transformers.StableLmForCausalLM, lambda vocab: transformers.StableLmConfig(
        vocab_size=vocab, intermediate_size=112, num_key_value_heads=2, use_parallel_residual=False, **_SHAPE)),
    "stablelm:parallel": (transformers.StableLmForCausalLM, lambda vocab: transformers.StableLmConfig(
        vocab_size=vocab, intermediate_size=112, num_key_value_heads=2, use_parallel_residual=True, **_SHAPE)),
    "falcon": (transformers.FalconForCausalLM, lambda vocab: transformers.FalconConfig(
        vocab_size=vocab, ffn_hidden_size=256, **_SHAPE)),  # Falcon-7B's shape; the loader sets a 4 x hidden MLP
    "qwen2": (transformers.Qwen2ForCausalLM, lambda vocab: transformers.Qwen2Config(
        vocab_size=vocab, intermediate_size=112, num_key_value_heads=2, **_SHAPE)),
}


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [*bytes_to_unicode().values(), "\u0120t", "<|endoftext|>"]


def write_tiny_gguf(path, arch: str, model) -> None:
    """`model` as a float32 GGUF file of architecture `arch`."""
    config = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(64)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
                                   or 4 * config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or 1)
    writer.add_layer_norm_eps(1e-5)
    writer.add_rope_dimension_count(4)
    tokens = _byte_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_pad_token_id(len(tokens) - 1)
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("key", list(GGUF_MODELS))
def test_gguf_loads_and_slices(tmp_path, monkeypatch, key):
    from slicegpt.io.models import load_model

    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    model_class, make_config = GGUF_MODELS[key]
    vocab = len(_byte_tokens())
    torch.manual_seed(0)
    dense = model_class(make_config(vocab)).eval()
    write_tiny_gguf(tmp_path / "tiny.gguf", key.split(":")[0], dense)

    model, tokenizer = load_model(str(tmp_path / "tiny.gguf"))
    assert type(model) is model_class
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
    assert family_for(model).parallel == (key in ("stablelm:parallel", "falcon"))
    result = slice_model(model, None, SliceConfig(sparsity=0.25), random_batches(vocab), progress=False)
    assert result.embedding_width == 48
