"""The slice's importance as llama.cpp's GGUF imatrix file, and quantized exports that use it."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from slicegpt import SliceConfig, slice_model
from slicegpt.cli import main
from slicegpt.io.checkpoint import save_sliced
from slicegpt.io.imatrix import gguf_weight_name, read_imatrix
from slicegpt.io.importance_file import IMPORTANCE_FILE, LEGACY_IMPORTANCE_FILE, importance_bytes

from conftest import random_batches
from test_export import tiny_bpe_tokenizer

gguf = pytest.importorskip("gguf")


def quantizable_slice(tmp_path, sparsity=0.25, layers=2):
    """A tiny Llama whose kept widths fit 32-value blocks (hidden 128 -> 96), sliced with one basis,
    saved with its importance as the slice command saves it."""
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    result = slice_model(model, None, SliceConfig(sparsity=sparsity, rotations="model", round_to=32),
                         random_batches(96, seqlen=32), progress=False)
    out = tmp_path / f"sliced-{sparsity}"
    extras = {IMPORTANCE_FILE: importance_bytes(result.importance, result.importance_tokens)}
    save_sliced(model, tiny_bpe_tokenizer(), out, report={"config": {"model": "tiny", "cal_seqlen": 32}},
                extra_files=extras)
    return out, result


def test_gguf_weight_names():
    assert gguf_weight_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q.weight"
    assert gguf_weight_name("model.layers.0.self_attn.o_proj") == "blk.0.attn_output.weight"
    assert gguf_weight_name("model.layers.11.mlp.down_proj") == "blk.11.ffn_down.weight"
    assert gguf_weight_name("lm_head") == "output.weight"
    assert gguf_weight_name("model.layers.0.attn_shortcut") is None


def test_export_writes_the_imatrix_beside_the_model(tmp_path):
    """`export --format gguf` writes MODEL.imatrix.gguf in llama-imatrix's layout: per weight an
    `.in_sum2` row (sums of squares) and a `.counts` value (tokens), named as the model's tensors."""
    directory, result = quantizable_slice(tmp_path)
    out = tmp_path / "model.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out)]) == 0
    imatrix = tmp_path / "model.imatrix.gguf"
    reader = gguf.GGUFReader(imatrix)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.chunk_size"] == 32 and fields["imatrix.chunk_count"] == 6  # 6 x 32 tokens
    assert "general.architecture" not in fields and len(fields["imatrix.datasets"]) == 1
    tensors = {t.name: t for t in reader.tensors}
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {f"blk.{i}.{kind}.weight" for i in range(2) for kind in kinds} | {"output.weight"}
    assert {name.rsplit(".", 1)[0] for name in tensors} == expected
    model_tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name in expected:
        sums, counts = tensors[f"{name}.in_sum2"], tensors[f"{name}.counts"]
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        # One row as long as the weight's rows (GGUF shapes list the row length first).
        assert list(sums.shape) == [model_tensors[name].shape[0], 1] and list(counts.shape) == [1, 1]
        assert float(np.asarray(counts.data).reshape(-1)[0]) == result.importance_tokens == 192
    means = read_imatrix(imatrix)
    ours = torch.tensor(result.importance["model.layers.1.mlp.down_proj"])
    assert np.allclose(means["blk.1.ffn_down.weight"], ours.numpy(), rtol=1e-5)
    assert means["blk.0.attn_q.weight"].shape == (96,)


def test_plain_export_keeps_the_importance(tmp_path):
    directory, _ = quantizable_slice(tmp_path)
    assert main(["export", str(directory), "--format", "plain", "--out", str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / IMPORTANCE_FILE).is_file()
    out = tmp_path / "plain.gguf"
    assert main(["export", str(tmp_path / "plain"), "--format", "gguf", "--out", str(out)]) == 0
    assert (tmp_path / "plain.imatrix.gguf").is_file()


def test_slice_command_saves_the_importance(tmp_path, tiny_model_dir):
    from conftest import tiny_slice_args

    out = tmp_path / "sliced"
    args = [a for a in tiny_slice_args(tiny_model_dir, out) if a != "--eval-ppl"]
    assert main(args + ["--rotations", "model"]) == 0
    from slicegpt.io.importance_file import read_importance

    importance, tokens = read_importance(out / IMPORTANCE_FILE)
    assert tokens == 4 * 64 and "model.layers.1.mlp.down_proj" in importance and "lm_head" in importance
    assert importance["model.layers.0.self_attn.q_proj"].shape == (48,)


@pytest.mark.parametrize("streaming", ["--no-streaming", "--streaming"])
def test_slice_output_has_only_weights_in_the_weights_pattern(tmp_path, tiny_model_dir, streaming):
    """vLLM loads every top-level *.safetensors of a model directory as weights: only the weights
    may match it, and export still finds the importance."""
    from conftest import tiny_slice_args

    out = tmp_path / "sliced"
    args = [a for a in tiny_slice_args(tiny_model_dir, out) if a != "--eval-ppl"]
    assert main(args + ["--rotations", "model", streaming]) == 0
    index = out / "model.safetensors.index.json"
    weights = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    assert {p.name for p in out.glob("*.safetensors")} == weights
    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert read_imatrix(tmp_path / "m.imatrix.gguf")["blk.0.attn_q.weight"].shape == (48,)


def test_export_reads_the_importance_where_earlier_versions_kept_it(tmp_path):
    directory, result = quantizable_slice(tmp_path)
    (directory / IMPORTANCE_FILE).rename(directory / LEGACY_IMPORTANCE_FILE)
    assert main(["export", str(directory), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    ours = np.asarray(result.importance["model.layers.1.mlp.down_proj"], dtype=np.float32)
    assert np.allclose(read_imatrix(tmp_path / "m.imatrix.gguf")["blk.1.ffn_down.weight"], ours, rtol=1e-5)
    assert main(["export", str(directory), "--format", "plain", "--out", str(tmp_path / "plain")]) == 0
    plain = tmp_path / "plain"
    assert (plain / IMPORTANCE_FILE).is_file() and not (plain / LEGACY_IMPORTANCE_FILE).exists()


def _quantizer_available() -> bool:
    return bool(shutil.which("llama-quantize")) or importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not _quantizer_available(), reason="no llama.cpp quantizer (llama-quantize on PATH or llama_cpp)")
def test_quantized_export_uses_the_imatrix(tmp_path):
    """A tiny slice quantizes through whichever quantizer this machine has; llama-quantize takes the
    slice's importance matrix, llama-cpp-python's function says it quantizes without one."""
    from slicegpt.io.llama_quantize import takes_imatrix

    directory, _ = quantizable_slice(tmp_path)
    out = tmp_path / "q4.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out), "--quantize", "Q4_0",
                 "--json"]) == 0
    assert out.is_file()
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    if takes_imatrix():
        assert (tmp_path / "q4.imatrix.gguf").is_file()
        unweighted = tmp_path / "q4-plain.gguf"
        assert main(["export", str(directory), "--format", "gguf", "--out", str(unweighted), "--quantize", "Q4_0",
                     "--no-imatrix"]) == 0
        weighted = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
        plain = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(unweighted).tensors}
        assert any(not np.array_equal(weighted[n], plain[n]) for n in weighted if n.startswith("blk."))


def test_imatrix_needs_an_existing_file(tmp_path, capsys):
    directory, _ = quantizable_slice(tmp_path)
    args = ["export", str(directory), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--imatrix",
            str(tmp_path / "missing.gguf")]
    assert main(args) == 2
    assert "importance matrix not found" in capsys.readouterr().err


def fake_quantizer(monkeypatch, fail: bool):
    """llama-quantize stood in for: it copies its input, or fails; it records the imatrix it was given."""
    from slicegpt.errors import SliceGPTError

    given = []

    def quantize(source, target, quant, quantizer=None, threads=2, imatrix=None):
        given.append((imatrix, imatrix is not None and imatrix.is_file()))
        if fail:
            raise SliceGPTError("llama.cpp's quantizer failed (fake)")
        shutil.copy(source, target)
        return {"out": target, "quantizer": "fake", "without_importance": []}

    monkeypatch.setattr("slicegpt.jobs.export.quantize_with_log", quantize)
    monkeypatch.setattr("slicegpt.jobs.export.takes_imatrix", lambda quantizer=None: True)
    return given


def test_failed_quantization_leaves_no_imatrix(tmp_path, monkeypatch):
    directory, _ = quantizable_slice(tmp_path)
    given = fake_quantizer(monkeypatch, fail=True)
    out = tmp_path / "exports" / "q4.gguf"
    out.parent.mkdir()
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out), "--quantize", "Q4_0"]) == 2
    assert given and given[0][1], "the quantizer was handed the slice's importance matrix"
    assert list(out.parent.iterdir()) == []


def test_quantized_export_publishes_the_imatrix_it_used(tmp_path, monkeypatch, capsys):
    directory, _ = quantizable_slice(tmp_path)
    given = fake_quantizer(monkeypatch, fail=False)
    out = tmp_path / "exports" / "q4.gguf"
    capsys.readouterr()
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out), "--quantize", "Q4_0",
                 "--json"]) == 0
    sidecar = tmp_path / "exports" / "q4.imatrix.gguf"
    assert given[0][0] != sidecar, "written under a temporary name until the export succeeds"
    assert json.loads(capsys.readouterr().out)["imatrix"] == str(sidecar)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q4.gguf", "q4.imatrix.gguf"]
    assert "blk.0.attn_q.weight" in read_imatrix(sidecar)


@pytest.mark.parametrize("quantize", [[], ["--quantize", "Q4_0"]])
def test_existing_imatrix_needs_overwrite(tmp_path, monkeypatch, capsys, quantize):
    directory, _ = quantizable_slice(tmp_path)
    fake_quantizer(monkeypatch, fail=False)
    out, sidecar = tmp_path / "m.gguf", tmp_path / "m.imatrix.gguf"
    sidecar.write_bytes(b"another model's importance matrix")
    args = ["export", str(directory), "--format", "gguf", "--out", str(out), *quantize]
    assert main(args) == 2
    assert f"{sidecar} exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert sidecar.read_bytes() == b"another model's importance matrix" and not out.exists()
    assert main(args + ["--overwrite"]) == 0
    assert "blk.0.attn_q.weight" in read_imatrix(sidecar)


def test_imatrix_beside_the_output_is_locked(tmp_path, capsys):
    from slicegpt.io.output_lock import output_lock

    directory, _ = quantizable_slice(tmp_path)
    out = tmp_path / "m.gguf"
    with output_lock(tmp_path / "m.imatrix.gguf"):
        assert main(["export", str(directory), "--format", "gguf", "--out", str(out)]) == 2
    assert "is being written by another slicegpt run" in capsys.readouterr().err
    assert not out.exists()


def test_round_for_a_gguf_type():
    from slicegpt import SliceConfig
    from slicegpt.commands.slice_options import describe_round_for, round_for

    assert round_for(8, "Q4_0") == 32 and round_for(8, "Q4_K_M") == 256 and round_for(8, None) == 8
    config = SliceConfig(sparsity=0.25, round_to=256)
    text = describe_round_for(config, 32, "Q4_K_M", 576)
    assert "kept width 256 of 576" in text and "instead of 416" in text and "the next width that fits, 512" in text


def test_slice_command_rounds_for_k_quants(tmp_path, tiny_model_dir, capsys):
    from conftest import tiny_slice_args

    out = tmp_path / "sliced"
    args = [a for a in tiny_slice_args(tiny_model_dir, out, sparsity=0.1) if a != "--eval-ppl"]
    assert main(args + ["--rotations", "model", "--round-for", "Q8_0"]) == 0
    assert "--round-for Q8_0: kept width 32 of 64" in capsys.readouterr().err
