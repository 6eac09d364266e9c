"""Sliced checkpoints generate with transformers' fast paths: a static KV cache gives the tokens
the default cache gives, through remote code, with and without shortcuts."""

import pytest
import torch
import transformers

from slicegpt import SliceConfig, save_sliced, slice_model

from conftest import make_tiny_model, random_batches


@pytest.mark.parametrize("rotations", ["model", "block"])
def test_static_cache_generates_the_same_tokens(tmp_path, rotations):
    model = make_tiny_model("LlamaForCausalLM", tied=True)
    slice_model(model, None, SliceConfig(sparsity=0.25, rotations=rotations), random_batches(96), progress=False)
    save_sliced(model, None, tmp_path / "sliced")
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sliced", trust_remote_code=True).eval()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    dynamic = remote.generate(ids, max_new_tokens=12, do_sample=False)
    static = remote.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
