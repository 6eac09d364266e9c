"""One rotation for the whole model: the result exports as a plain model of its class."""

import pytest
import torch
import transformers

from slicegpt import SliceConfig, SliceGPTError, slice_model
from slicegpt.architectures.families import family_for
from slicegpt.architectures.plain import to_plain_model

from conftest import make_tiny_model, random_batches


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                  "SmolLM3ForCausalLM", "GraniteForCausalLM"])
@pytest.mark.parametrize("tied", [True, False])
def test_plain_export_computes_the_same(tmp_path, arch, tied):
    model = make_tiny_model(arch, tied=tied)
    family = family_for(model)
    slice_model(model, None, SliceConfig(sparsity=0.25, rotations="model"), random_batches(96), progress=False)
    plain = to_plain_model(model, family)
    assert plain.config.hidden_size == 48 and not hasattr(plain.config, "slicing")
    ids = torch.randint(0, 96, (2, 12))
    assert (plain(ids).logits - model(ids).logits).abs().max() < 1e-5
    plain.save_pretrained(tmp_path / "plain")
    # No remote code; eager attention as in memory, so the logits can be compared exactly.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert type(reloaded) is type(plain)
    assert torch.equal(reloaded(ids).logits, plain(ids).logits)


def test_plain_export_needs_one_rotation():
    model = make_tiny_model("LlamaForCausalLM")
    family = family_for(model)
    slice_model(model, None, SliceConfig(sparsity=0.25, rotations="block"), random_batches(96), progress=False)
    with pytest.raises(SliceGPTError, match="--rotations model"):
        to_plain_model(model, family)


def test_plain_export_refuses_layernorm_models_clearly():
    """A tied LayerNorm head stays tied in the sliced model; the plain class has no norm that ignores
    the mean coordinate, so plain export refuses it (as it refuses every LayerNorm family)."""
    model = make_tiny_model("OPTForCausalLM", tied=True)
    family = family_for(model)
    slice_model(model, None, SliceConfig(sparsity=0.25, rotations="model"), random_batches(96), progress=False)
    assert model.config.slicing["tied_head"]
    with pytest.raises(SliceGPTError, match="plain RMSNorm"):
        to_plain_model(model, family)
