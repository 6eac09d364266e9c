"""One small test on the real SmolLM2-135M: exact fusion, sane slicing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slicegpt import SliceConfig, perplexity, slice_model
from slicegpt.io.data import load_texts
from slicegpt.architectures.families import family_for
from slicegpt.method.fusion import fuse

from conftest import WIKITEXT_TEST, WIKITEXT_VALIDATION

pytestmark = pytest.mark.slow


def test_fusion_is_exact_on_smollm2(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        fuse(model, family_for(model))
        fused = model(ids).logits
    assert (fused - reference).abs().max().item() <= 1e-4


def test_sliced_smollm2_perplexity_is_sane(smollm2_dir, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    test_texts = load_texts(str(WIKITEXT_TEST))
    dense = perplexity(model, smollm2_tokenizer, test_texts, chunks=2, progress=False)["ppl"]
    config = SliceConfig(sparsity=0.25, cal_samples=8, cal_seqlen=512, cal_batch_size=4)
    slice_model(model, smollm2_tokenizer, config, load_texts(str(WIKITEXT_VALIDATION)), progress=False)
    sliced = perplexity(model, smollm2_tokenizer, test_texts, chunks=2, progress=False)["ppl"]
    assert 10 < dense < 40
    assert dense * 1.05 < sliced < dense * 8
