"""Least-squares refit of the output projections (--refit)."""

import pytest
import torch

from slicegpt import SliceConfig, slice_model
from slicegpt.method.refit import LeastSquares

from conftest import TINY_CONFIGS, full_precision_norms, make_tiny_model, random_batches


def test_least_squares_recovers_a_known_map():
    torch.manual_seed(0)
    W = torch.randn(5, 7, dtype=torch.float64)
    Z = torch.randn(400, 7, dtype=torch.float64)
    solver = LeastSquares(7, 5, "cpu")
    solver.add(Z[:150], Z[:150] @ W.T, None)
    mask = torch.ones(250)
    mask[:10] = 0  # masked tokens are not counted, whatever they hold
    R = Z[150:] @ W.T
    R[:10] = 1e6
    solver.add(Z[150:], R, mask)
    assert torch.allclose(solver.solve(torch.zeros(5, 7), damping=0.0), W, atol=1e-5)
    # The ridge term pulls towards the previous weights.
    far = solver.solve(torch.zeros(5, 7), damping=1e3)
    assert far.abs().max() < 0.05 * W.abs().max()


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_refit_without_slicing_is_exact(arch):
    """At full width the sliced layer already writes the target, so the refit keeps every weight."""
    model = make_tiny_model(arch, tied=True, dtype=torch.float64)
    full_precision_norms(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    reference = model(ids).logits
    slice_model(model, None, SliceConfig(sparsity=0.0, rotations="model", refit=True),
                random_batches(model.config.vocab_size), progress=False)
    assert (model(ids).logits - reference).abs().max().item() <= 1e-9


@pytest.mark.parametrize("arch,rotations", [("LlamaForCausalLM", "model"), ("LlamaForCausalLM", "layer"),
                                            ("LlamaForCausalLM", "block"), ("PhiForCausalLM", "block"),
                                            ("GPTNeoXForCausalLM", "model"), ("OPTForCausalLM", "group:1"),
                                            ("Qwen2MoeForCausalLM", "model")])
def test_refit_brings_the_sliced_model_closer_to_the_dense_one(arch, rotations):
    """On the calibration text, the refit model's logits are nearer the dense model's."""
    batches = random_batches(96, count=4, batch=4, seqlen=24)
    dense = make_tiny_model(arch)
    reference = [dense(**b).logits for b in batches]
    errors = {}
    for refit in (False, True):
        model = make_tiny_model(arch)
        slice_model(model, None, SliceConfig(sparsity=0.25, rotations=rotations, refit=refit), batches,
                    progress=False)
        errors[refit] = sum((model(**b).logits - r).pow(2).mean().item() for b, r in zip(batches, reference))
    assert errors[True] < 0.95 * errors[False], errors


@pytest.mark.parametrize("rotations", ["block", "model"])
def test_refit_without_slicing_is_exact_for_every_rotation_mode(rotations):
    model = make_tiny_model("Qwen2ForCausalLM", dtype=torch.float64)
    full_precision_norms(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    reference = model(ids).logits
    slice_model(model, None, SliceConfig(sparsity=0.0, rotations=rotations, refit=True),
                random_batches(model.config.vocab_size), progress=False)
    assert (model(ids).logits - reference).abs().max().item() <= 1e-9
