"""`slicegpt export`: a slice with one basis as a plain directory or a GGUF file read back with gguf's reader."""

import json

import numpy as np
import pytest
import torch
import transformers

from slicegpt import SliceConfig, SliceGPTError, slice_model
from slicegpt.architectures.families import family_for
from slicegpt.cli import main
from slicegpt.io.checkpoint import save_sliced
from slicegpt.io.gguf_export import reorder_rotary_rows
from slicegpt.io.llama_quantize import fallback_type, width_misfits

from conftest import make_tiny_model, random_batches

gguf = pytest.importorskip("gguf")

SPECIAL = "<|endoftext|>"


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer with 96 ids (90 byte symbols, 5 merges, 1 special), like GPT-2's in miniature."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())[:90]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges = [(symbols[i], symbols[i + 1]) for i in range(0, 10, 2)]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL, bos_token=SPECIAL)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert len(tokenizer) == 96
    return tokenizer


def sliced_dir(tmp_path, arch, tied=True, rotations="model"):
    model = make_tiny_model(arch, tied=tied)
    slice_model(model, None, SliceConfig(sparsity=0.25, rotations=rotations), random_batches(96), progress=False)
    out = tmp_path / f"sliced-{arch}-{tied}-{rotations}"
    save_sliced(model, tiny_bpe_tokenizer(), out, report={"config": {"model": "tiny"}})
    return out, model


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("arch,prefix", [("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "llama"),
                                         ("Qwen2ForCausalLM", "qwen2"), ("Qwen3ForCausalLM", "qwen3")])
def test_gguf_export_reads_back(tmp_path, arch, prefix):
    directory, model = sliced_dir(tmp_path, arch, tied=True)
    out = tmp_path / "model.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out), "--outtype", "f32"]) == 0
    fields, tensors = read_gguf(out)
    config = model.config
    dim = config.head_dim if getattr(config, "head_dim", None) else 16
    assert fields["general.architecture"] == prefix
    assert fields[f"{prefix}.embedding_length"] == 48  # the sliced width, not the dense 64
    assert fields[f"{prefix}.block_count"] == 2
    assert fields[f"{prefix}.feed_forward_length"] == 112
    assert fields[f"{prefix}.attention.head_count"] == 4 and fields[f"{prefix}.attention.head_count_kv"] == 2
    assert fields[f"{prefix}.attention.key_length"] == dim and fields[f"{prefix}.attention.value_length"] == dim
    # The norms divide by the sliced width in a plain model: epsilon scaled by dense / sliced.
    assert fields[f"{prefix}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps * 64 / 48)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "default"
    assert len(fields["tokenizer.ggml.tokens"]) == 96 and fields["tokenizer.ggml.tokens"][95] == SPECIAL
    assert fields["tokenizer.ggml.token_type"][95] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.NORMAL
    assert len(fields["tokenizer.ggml.merges"]) == 5
    assert fields["tokenizer.ggml.eos_token_id"] == 95
    assert "messages" in fields["tokenizer.chat_template"]
    assert "untied" in fields["general.description"]
    # GGUF shapes are (in, out): row length first.
    heads_q, heads_kv = 4 * dim, 2 * dim
    assert list(tensors["token_embd.weight"].shape) == [48, 96]
    assert list(tensors["output.weight"].shape) == [48, 96]  # the tied head, untied
    assert list(tensors["blk.0.attn_q.weight"].shape) == [48, heads_q]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [48, heads_kv]
    assert list(tensors["blk.1.attn_output.weight"].shape) == [heads_q, 48]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [112, 48]
    assert list(tensors["blk.1.ffn_gate.weight"].shape) == [48, 112]
    assert list(tensors["output_norm.weight"].shape) == [48]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    if prefix == "qwen2":
        assert list(tensors["blk.0.attn_q.bias"].shape) == [heads_q]
    if prefix == "qwen3":
        assert list(tensors["blk.0.attn_q_norm.weight"].shape) == [dim]
    if arch == "LlamaForCausalLM":  # llama3 RoPE scaling travels as per-frequency factors
        assert list(tensors["rope_freqs.weight"].shape) == [dim // 2]
    expected = 9 + {"llama": 0, "qwen2": 3, "qwen3": 2}[prefix]  # 2 norms, 4 attention, 3 MLP; biases; q/k norms
    assert len([n for n in tensors if n.startswith("blk.0.")]) == expected


def test_gguf_tensor_values(tmp_path):
    """The weights are the plain model's, q/k rows reordered per head for llama.cpp's rotary layout."""
    directory, _ = sliced_dir(tmp_path, "LlamaForCausalLM", tied=False)
    out = tmp_path / "model.gguf"
    assert main(["export", str(directory), "--format", "plain", "--out", str(tmp_path / "plain")]) == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out)]) == 0
    _, tensors = read_gguf(out)
    q = plain.model.layers[1].self_attn.q_proj.weight.detach()
    stored = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data)).float()
    assert tensors["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert torch.allclose(stored, reorder_rotary_rows(q, 4), atol=1e-3)
    assert not torch.allclose(stored, q, atol=1e-3)
    norm = torch.from_numpy(np.array(tensors["blk.0.attn_norm.weight"].data))
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.allclose(norm, torch.full((48,), (64 / 48) ** 0.5))


def test_reorder_rotary_rows_interleaves_halves():
    rows = torch.arange(8.0).reshape(8, 1)  # two heads of 4: (0 1 | 2 3), (4 5 | 6 7)
    assert reorder_rotary_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_plain_export_loads_without_remote_code(tmp_path, arch):
    directory, model = sliced_dir(tmp_path, arch, tied=True)
    out = tmp_path / "plain"
    assert main(["export", str(directory), "--format", "plain", "--out", str(out)]) == 0
    assert not (out / "modeling_sliced.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "slicing" not in config and config["hidden_size"] == 48
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(plain).__name__ == arch
    ids = torch.randint(0, 96, (2, 10))
    assert (plain(ids).logits - model(ids).logits).abs().max() < 1e-4
    card = (out / "README.md").read_text()
    assert "The tied head is untied" in card and "(vocab 96 x width 48)" in card
    report = json.loads((out / "slicing_report.json").read_text())
    assert report["export"]["untied_head"] is True


def test_export_refuses_shortcuts(tmp_path, capsys):
    directory, _ = sliced_dir(tmp_path, "LlamaForCausalLM", rotations="block")
    for fmt, out in (("plain", tmp_path / "p"), ("gguf", tmp_path / "m.gguf")):
        assert main(["export", str(directory), "--format", fmt, "--out", str(out)]) == 2
        assert "--rotations model" in capsys.readouterr().err
        assert not out.exists()


def test_gguf_export_refuses_other_architectures(tmp_path, capsys):
    model = make_tiny_model("Phi3ForCausalLM")
    model.save_pretrained(tmp_path / "phi3")
    tiny_bpe_tokenizer().save_pretrained(tmp_path / "phi3")
    assert main(["export", str(tmp_path / "phi3"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "not Phi3ForCausalLM" in capsys.readouterr().err


def test_width_misfits_name_the_fallback():
    shapes = {"a.weight": (112, 48), "b.weight": (48, 112), "norm.weight": (48,), "c.weight": (64, 512)}
    misfits = width_misfits(shapes, "Q4_K_M")
    assert [m["tensor"] for m in misfits] == ["a.weight", "b.weight"]
    assert misfits[0] == {"tensor": "a.weight", "row_length": 48, "block": 256, "stored_as": "F16"}
    assert [m["tensor"] for m in width_misfits({"d.weight": (8, 96), "e.weight": (8, 112)}, "Q8_0")] == ["e.weight"]
    assert fallback_type("Q4_K", 576) == "Q5_0" and fallback_type("Q4_K", 48) == "F16"
    assert fallback_type("Q6_K", 480) == "Q8_0" and fallback_type("Q8_0", 48) == "F16"


def test_quantized_export_refuses_misfit_widths(tmp_path, capsys):
    directory, _ = sliced_dir(tmp_path, "LlamaForCausalLM", tied=False)
    out = tmp_path / "q.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out), "--quantize", "Q4_K_M"]) == 2
    err = capsys.readouterr().err
    assert "rows of 48, 64, 112 values, not a multiple of 256" in err and "--round-to 256" in err
    assert not out.exists()


def test_quantized_export_without_a_quantizer(tmp_path, capsys, monkeypatch):
    import importlib.util
    import shutil

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    directory, _ = sliced_dir(tmp_path, "LlamaForCausalLM", tied=False)
    out = tmp_path / "q.gguf"
    args = ["export", str(directory), "--format", "gguf", "--out", str(out), "--quantize", "Q8_0", "--allow-fallback"]
    assert main(args) == 2
    assert "needs llama.cpp's quantizer" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_plain_model_from_a_loaded_checkpoint_keeps_the_function(tmp_path):
    """A checkpoint loaded from disk (the Sliced... class) converts like the model in memory."""
    from slicegpt.jobs.export import plain_model

    directory, model = sliced_dir(tmp_path, "MistralForCausalLM", tied=False)
    plain, _, note = plain_model(directory)
    assert note is None and type(plain) is transformers.MistralForCausalLM
    ids = torch.randint(0, 96, (1, 9))
    family_for(plain)  # a registered, checkable family again
    assert (plain(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_dense_tied_model_keeps_one_table(tmp_path):
    """A plain dense model with a tied head: llama.cpp reuses token_embd, so no output tensor is written."""
    model = make_tiny_model("LlamaForCausalLM", tied=True)
    model.save_pretrained(tmp_path / "dense")
    tiny_bpe_tokenizer().save_pretrained(tmp_path / "dense")
    out = tmp_path / "dense.gguf"
    args = ["export", str(tmp_path / "dense"), "--format", "gguf", "--out", str(out), "--tokenizer-pre", "smollm"]
    assert main(args) == 0
    fields, tensors = read_gguf(out)
    assert "output.weight" not in tensors and list(tensors["token_embd.weight"].shape) == [64, 96]
    assert fields["llama.embedding_length"] == 64 and fields["tokenizer.ggml.pre"] == "smollm"
    assert "general.description" not in fields
    assert main(args) == 2  # an existing file needs --overwrite
