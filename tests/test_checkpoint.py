"""Sliced models save as plain Hugging Face directories and load back identically."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from slicegpt import SliceConfig, load_sliced, save_sliced, slice_model
from slicegpt.io.checkpoint import REPORT_FILE

from conftest import make_tiny_model, random_batches


def _sliced_tiny(arch="LlamaForCausalLM", tied=True, sparsity=0.25):
    model = make_tiny_model(arch, tied=tied)
    config = SliceConfig(sparsity=sparsity, round_to=8, rotations="block")
    result = slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    return model, result


def test_slicing_gives_configured_widths():
    model, result = _sliced_tiny(sparsity=0.25)
    kept = int(0.75 * 64) // 8 * 8
    assert result.embedding_width == kept and result.head_in == kept
    assert all(w == {"in": kept, "mid": kept, "out": kept} for w in result.layer_widths)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape[1] == kept
    assert layer.self_attn.o_proj.weight.shape[0] == kept
    assert layer.mlp.down_proj.weight.shape[0] == kept
    assert layer.attn_shortcut.weight.shape == (kept, kept)
    assert model.get_input_embeddings().weight.shape == (model.config.vocab_size, kept)


def test_round_to_controls_the_width():
    assert SliceConfig(sparsity=0.3, round_to=8).kept_width(576) == 400
    assert SliceConfig(sparsity=0.3, round_to=1).kept_width(576) == 403
    assert SliceConfig(sparsity=0.0).kept_width(576) == 576


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_save_and_load_with_slicegpt(tmp_path, arch):
    model, _ = _sliced_tiny(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    expected = model(ids).logits
    save_sliced(model, None, tmp_path / "out", report={"params": {}})
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not list((tmp_path / "out").glob("*.bin")), "only safetensors, never pickles"
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text()) == {"params": {}}
    # Serving engines pick their model by this name: the base class's code cannot run the slice.
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [f"Sliced{arch}"]
    loaded = load_sliced(tmp_path / "out", attn_implementation="eager")  # as the tiny model in memory
    assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize("arch,tied", [("MistralForCausalLM", False), ("LlamaForCausalLM", True)])
def test_remote_code_loads_without_slicegpt(tmp_path, arch, tied):
    """A fresh process where slicegpt cannot be imported loads the directory via auto_map."""
    model, _ = _sliced_tiny(arch, tied=tied)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    expected = model(ids).logits
    save_sliced(model, None, tmp_path / "out")
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if not p.endswith("src")]
        sys.modules["slicegpt"] = None  # any import of slicegpt now fails
        try:
            import slicegpt
            raise SystemExit("slicegpt is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True,
                                                     attn_implementation="eager")
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        torch.save(model(ids).logits, {str(tmp_path / 'logits.pt')!r})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_tied_head_stays_tied(tmp_path):
    model, result = _sliced_tiny("LlamaForCausalLM", tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.norm.map.weight.shape == (result.embedding_width, result.head_in)
    save_sliced(model, None, tmp_path / "out")
    loaded = load_sliced(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.config.tie_word_embeddings


def test_untie_head_option():
    model = make_tiny_model("LlamaForCausalLM", tied=True)
    config = SliceConfig(sparsity=0.25, tied_head=False)
    slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.slicing["tied_head"]


# Shortcut matrices for L layers: two per layer; one per layer after the first (which shares
# the embeddings' basis); none within a group (the tiny model's 2 layers are one group:2).
@pytest.mark.parametrize("rotations,shortcuts", [("block", lambda L: 2 * L), ("layer", lambda L: L - 1),
                                                 ("group:2", lambda L: 0), ("model", lambda L: 0)])
def test_rotation_sharing_drops_shortcuts_and_round_trips(tmp_path, rotations, shortcuts):
    from slicegpt.sizing.counts import shortcut_parameters

    model = make_tiny_model("LlamaForCausalLM", tied=True)
    config = SliceConfig(sparsity=0.25, rotations=rotations)
    slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    width = config.kept_width(64)
    assert shortcut_parameters(model) == shortcuts(model.config.num_hidden_layers) * width * width
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    save_sliced(model, None, tmp_path / "out")
    assert torch.equal(load_sliced(tmp_path / "out", attn_implementation="eager")(ids).logits, model(ids).logits)
