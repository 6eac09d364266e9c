"""Fusion, and rotation without slicing, must not change what the model computes."""

import pytest
import torch

from slicegpt.architectures.families import family_for
from slicegpt.config import SliceConfig
from slicegpt.method.fusion import fuse
from slicegpt.method.slicing import constant_width
from slicegpt.running.driver import slice_layers
from slicegpt.running.layer_store import ResidentStore

from conftest import TINY_CONFIGS, full_precision_norms, make_tiny_model, random_batches

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
CASES = [(arch, tied, dtype) for arch in TINY_CONFIGS for tied in (False, True)
         for dtype in (torch.float32, torch.float64)]


def _ids(vocab):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(7))


def _dense(arch, tied, dtype):
    model = make_tiny_model(arch, tied=tied, dtype=dtype)
    if dtype == torch.float64:
        full_precision_norms(model)
    return model


@pytest.mark.parametrize("arch,tied,dtype", CASES)
def test_fusion_is_exact(arch, tied, dtype):
    model = _dense(arch, tied, dtype)
    ids = _ids(model.config.vocab_size)
    reference = model(ids).logits
    fuse(model, family_for(model))
    assert (model(ids).logits - reference).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("arch,tied,dtype", CASES)
def test_rotation_without_slicing_is_exact(arch, tied, dtype):
    model = _dense(arch, tied, dtype)
    ids = _ids(model.config.vocab_size)
    reference = model(ids).logits
    dense_embedding = model.get_input_embeddings().weight.detach().clone()
    config = SliceConfig(sparsity=0.0, rotations="block")
    slice_layers(ResidentStore(model, family_for(model), config, progress=False), config,
                 random_batches(model.config.vocab_size), width_rule=constant_width(model.config.hidden_size))
    assert (model(ids).logits - reference).abs().max().item() <= TOLERANCE[dtype]
    # The rotation really happened: same width, different embedding matrix.
    rotated = model.get_input_embeddings().weight
    assert rotated.shape == dense_embedding.shape
    assert (rotated - dense_embedding).abs().max() > 1e-3


def test_float64_router_reference_routes_as_the_model_does():
    """The float64 stand-in for DeepSeek-V3's float32 router (conftest) computes the same routing."""
    model = make_tiny_model("DeepseekV3ForCausalLM", dtype=torch.float64)
    router = model.model.layers[1].mlp.gate  # layer 0 is dense (first_k_dense_replace)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.1)
        x = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        _, weights, indices = router(x)
        full_precision_norms(model)
        _, exact_weights, exact_indices = router(x)
    order, exact_order = indices.sort(-1).indices, exact_indices.sort(-1).indices
    assert torch.equal(indices.gather(1, order), exact_indices.gather(1, exact_order))
    assert torch.allclose(weights.gather(1, order).double(), exact_weights.gather(1, exact_order), rtol=1e-5, atol=1e-7)


def test_norms_were_non_trivial():
    """Guards the fixtures: with unit norm weights fusion would be trivially exact."""
    model = make_tiny_model("LlamaForCausalLM")
    weight = model.model.layers[0].input_layernorm.weight
    assert (weight - 1).abs().max() > 0.1


@pytest.mark.parametrize("rotations", ["layer", "group:1", "model", "block-normalized"])
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_shared_rotations_without_slicing_are_exact(arch, rotations):
    from slicegpt import SliceConfig, slice_model

    model = _dense(arch, True, torch.float64)
    ids = _ids(model.config.vocab_size)
    reference = model(ids).logits
    rotations, _, pca = rotations.partition("-")
    config = SliceConfig(sparsity=0.0, rotations=rotations, pca=pca or "raw")
    slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    assert (model(ids).logits - reference).abs().max().item() <= TOLERANCE[torch.float64]


LAYERNORM = ["OPTForCausalLM", "GPT2LMHeadModel", "PhiForCausalLM", "GPTNeoXForCausalLM",
             "GPTNeoXForCausalLM:sequential", "CohereForCausalLM", "StableLmForCausalLM",
             "StableLmForCausalLM:parallel", "FalconForCausalLM", "FalconForCausalLM:two_norms",
             "FalconForCausalLM:sequential", "FalconForCausalLM:new_one_norm", "GPTJForCausalLM"]


@pytest.mark.parametrize("rotations", ["block", "model"])
@pytest.mark.parametrize("arch", LAYERNORM)
def test_tied_layernorm_head_stays_tied_and_exact(arch, rotations):
    """The mean axis: no centring, embeddings shared with the head, logits unchanged at full width."""
    from slicegpt import SliceConfig, slice_model
    from slicegpt.sizing.counts import count_parameters

    model = _dense(arch, True, torch.float64)
    ids = _ids(model.config.vocab_size)
    reference = model(ids).logits
    family = family_for(model)
    norms = [family.final_norm] + [f"{family.layers}.{i}.{path}" for i in range(model.config.num_hidden_layers)
                                   for path in filter(None, (family.attn_norm, family.mlp_norm))]
    folded = sum(p.numel() for path in norms for p in model.get_submodule(path).parameters())
    dense_count = count_parameters(model)
    # A LayerNorm's shift becomes a bias of each reader that has none (Falcon, GPT-J, StableLM's MLP);
    # the final map has a bias where the final norm has one (not Cohere's).
    def shifted(layer, norm):
        return getattr(layer.get_submodule(norm), "bias", None) is not None

    gained = 0
    for layer in model.get_submodule(family.layers):
        for norm, readers in ((family.attn_norm, family.attn_inputs),
                              (family.mlp_norm or family.attn_norm, family.mlp_inputs)):
            gained += sum(layer.get_submodule(path).out_features for path in readers
                          if shifted(layer, norm) and layer.get_submodule(path).bias is None)
    final_bias = getattr(model.get_submodule(family.final_norm), "bias", None) is not None
    slice_model(model, None, SliceConfig(sparsity=0.0, rotations=rotations), random_batches(model.config.vocab_size),
                progress=False)
    assert model.config.slicing["tied_head"] and model.config.slicing["mean_axis"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (model(ids).logits - reference).abs().max().item() <= TOLERANCE[torch.float64]
    if rotations == "model":  # no shortcuts: the final map (and its bias) is all the tied head adds
        width = model.config.hidden_size
        assert count_parameters(model) == dense_count - folded + width * width + width * final_bias + gained


@pytest.mark.parametrize("arch", LAYERNORM)
def test_untied_layernorm_models_are_still_centred(arch):
    model = make_tiny_model(arch, tied=False)
    fuse(model, family_for(model))
    embedding = model.get_input_embeddings().weight
    assert embedding.mean(-1).abs().max() < 1e-6
    assert model.get_output_embeddings().weight is not embedding
