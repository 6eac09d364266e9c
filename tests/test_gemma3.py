"""Small tests on the real Gemma 3 270M: exact in float64 (post-norm maps, tied head), sane when sliced."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slicegpt import SliceConfig, perplexity, slice_model
from slicegpt.architectures.families import family_for
from slicegpt.io.data import load_texts
from slicegpt.method.slicing import constant_width
from slicegpt.running.driver import slice_layers
from slicegpt.running.layer_store import ResidentStore

from conftest import WIKITEXT_TEST, WIKITEXT_VALIDATION, full_precision_norms, random_batches

pytestmark = pytest.mark.slow


def test_fusion_and_rotation_are_exact_on_gemma3_in_float64(gemma3_dir):
    """The post-norm scales of the real model spread far (one runs from -0.1 to 741): folding
    them into maps must still reproduce the dense logits to float64 precision."""
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float64).eval()
    full_precision_norms(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    family = family_for(model)
    with torch.no_grad():
        reference = model(ids).logits
        config = SliceConfig(sparsity=0.0, rotations="block")
        store = ResidentStore(model, family, config, progress=False)
        store.open()  # fuses
        fused = model(ids).logits
        slice_layers(store, config, random_batches(model.config.vocab_size, count=1, batch=1, seqlen=32),
                     width_rule=constant_width(model.config.hidden_size))
        rotated = model(ids).logits
    scale = reference.abs().max().item()
    assert (fused - reference).abs().max().item() <= 1e-10 * scale
    assert (rotated - reference).abs().max().item() <= 1e-10 * scale


def test_sliced_gemma3_perplexity_is_sane(gemma3_dir):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    test_texts = load_texts(str(WIKITEXT_TEST))
    dense = perplexity(model, tokenizer, test_texts, seqlen=256, chunks=2, progress=False)["ppl"]
    # 1024 calibration tokens: more than the width (640), so every covariance has full rank.
    config = SliceConfig(sparsity=0.25, widths="uniform", cal_samples=4, cal_seqlen=256, cal_batch_size=4)
    slice_model(model, tokenizer, config, load_texts(str(WIKITEXT_VALIDATION)), progress=False)
    assert model.config.slicing["config"]["rotations"] == "block"  # auto, for a family with post-norms
    sliced = perplexity(model, tokenizer, test_texts, seqlen=256, chunks=2, progress=False)["ppl"]
    assert 5 < dense < 100
    assert dense * 1.02 < sliced < dense * 10  # bench/README.md: about 5.4 x on a reduced protocol


def test_embedding_widths_on_gemma3(gemma3_dir):
    """Only the embeddings sliced: exact at full width in float64, and at 0.85 x dense the
    perplexity stays within a small factor (bench/README.md: the protocol P figures)."""
    from transformers import AutoTokenizer

    from slicegpt.sizing.counts import count_parameters
    from slicegpt.sizing.layout import resolve_layout

    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float64).eval()
    full_precision_norms(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        slice_model(model, None, SliceConfig(sparsity=0.0, widths="embedding"),
                    random_batches(model.config.vocab_size, count=1, batch=1, seqlen=32), progress=False)
        assert (model(ids).logits - reference).abs().max().item() <= 1e-10 * reference.abs().max().item()

    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    for settings in ({"sparsity": 0.25}, {"target_ratio": 0.85}):  # what --widths auto picks here
        assert resolve_layout(model, family_for(model), SliceConfig(**settings)).widths == "embedding"
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    test_texts = load_texts(str(WIKITEXT_TEST))
    dense = perplexity(model, tokenizer, test_texts, seqlen=256, chunks=2, progress=False)["ppl"]
    dense_params = count_parameters(model)
    config = SliceConfig(target_ratio=0.85, widths="embedding", cal_samples=4, cal_seqlen=256, cal_batch_size=4)
    slice_model(model, tokenizer, config, load_texts(str(WIKITEXT_VALIDATION)), progress=False)
    assert count_parameters(model) <= 0.85 * dense_params
    sliced = perplexity(model, tokenizer, test_texts, seqlen=256, chunks=2, progress=False)["ppl"]
    assert dense < sliced < dense * 3
