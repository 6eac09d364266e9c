"""Least-squares refit of the output projections (--refit)."""

import pytest
import torch

from slicegpt import SliceConfig, slice_model
from slicegpt.architectures.family import get_module
from slicegpt.architectures.modeling_sliced import first_output
from slicegpt.method import refit as refit_module
from slicegpt.method.refit import LeastSquares, refittable

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
def test_refit_brings_the_sliced_model_closer_to_the_dense_one(arch, rotations, monkeypatch):
    """On the text it fits (all the calibration text here), the refit model's logits are nearer
    the dense model's. A light ridge, so the fit shows: the default one trades closeness on
    the calibration text for staying near the rotated weights elsewhere."""
    monkeypatch.setattr(refit_module, "DAMPING", 1e-2)
    batches = random_batches(96, count=4, batch=4, seqlen=24)
    dense = make_tiny_model(arch)
    reference = [dense(**b).logits for b in batches]
    errors = {}
    for refit in (False, True):
        model = make_tiny_model(arch)
        slice_model(model, None, SliceConfig(sparsity=0.25, rotations=rotations, refit=refit, refit_share=1.0),
                    batches, progress=False)
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


def test_refitting_maps_in_turn_from_one_set_of_sums():
    """Two maps side by side refit one after the other: the first against R alone, the
    second against what the refit first one leaves over."""
    torch.manual_seed(1)
    Za, Zb = torch.randn(300, 4, dtype=torch.float64), torch.randn(300, 6, dtype=torch.float64)
    Wa, Wb = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    R = torch.randn(300, 3, dtype=torch.float64)
    both = LeastSquares(10, 3, "cpu")
    both.add(torch.cat([Za, Zb], -1), R, None)
    new_a, new_b = both.solve_in_turn([Wa, Wb], damping=0.1)
    first = LeastSquares(4, 3, "cpu")
    first.add(Za, R + Za @ Wa.T, None)
    assert torch.allclose(new_a, first.solve(Wa, 0.1), atol=1e-10)
    second = LeastSquares(6, 3, "cpu")
    second.add(Zb, R - Za @ (new_a - Wa).T + Zb @ Wb.T, None)
    assert torch.allclose(new_b, second.solve(Wb, 0.1), atol=1e-10)


class _Tap:
    def __init__(self, module, output=False):
        self.value = None
        if output:
            self.handle = module.register_forward_hook(lambda m, args, out: setattr(self, "value", first_output(out)))
        else:
            self.handle = module.register_forward_pre_hook(lambda m, args: setattr(self, "value", args[0]))


@torch.no_grad()
def _refit_by_rerunning(projection, run, targets, masks, where, where_output, damping):
    solver = LeastSquares(projection.weight.shape[1], projection.weight.shape[0], projection.weight.device)
    inputs, stream = _Tap(projection), _Tap(where, output=where_output)
    for index, target in enumerate(targets):
        run(index)
        Z = inputs.value
        solver.add(Z, target - (stream.value - Z @ projection.weight.T), masks[index])
    inputs.handle.remove()
    stream.handle.remove()
    projection.weight.data = solver.solve(projection.weight, damping).to(projection.weight.dtype)


@torch.no_grad()
def _three_pass_refit_layer(dense, sliced, family, dense_acts, sliced_acts, kwargs, Q_mid, Q_out):
    """The refit as it was first written: the sliced layer runs whole three times (refit the
    attention output, refit the MLP's, move the stream on); the reference for the one-pass refit."""
    damping = refit_module.DAMPING
    sequential = not sliced.parallel
    attention, mlp = refittable(sliced, family.writers("attn")), refittable(sliced, family.writers("mlp"))
    mid_targets, out_targets = [], []
    mid_tap = _Tap(get_module(dense, family.mlp_norm)) if sequential and attention is not None else None

    def advance(x, kw):
        y = first_output(dense(x, **kw))
        if mid_tap is not None:
            mid_targets.append(mid_tap.value @ Q_mid.to(y.device, y.dtype))
        out_targets.append(y @ Q_out.to(y.device, y.dtype))
        return y

    dense_acts.map(advance, kwargs)
    if mid_tap is not None:
        mid_tap.handle.remove()

    def run_sliced(index):
        return first_output(sliced(sliced_acts.hidden[index], **kwargs[index]))

    if attention is not None and sequential:
        _refit_by_rerunning(attention, run_sliced, mid_targets, sliced_acts.masks,
                            get_module(sliced, family.mlp_norm), False, damping)
    elif attention is not None:
        _refit_by_rerunning(attention, run_sliced, out_targets, sliced_acts.masks, sliced, True, damping)
    if mlp is not None:
        _refit_by_rerunning(mlp, run_sliced, out_targets, sliced_acts.masks, sliced, True, damping)
    sliced_acts.map(lambda x, kw: first_output(sliced(x, **kw)), kwargs)


@pytest.mark.parametrize("arch,rotations", [
    ("LlamaForCausalLM", "model"), ("LlamaForCausalLM", "block"), ("PhiForCausalLM", "block"),
    ("PhiForCausalLM", "model"), ("GPTNeoXForCausalLM", "model"), ("GPTNeoXForCausalLM:sequential", "block"),
    ("FalconForCausalLM:two_norms", "model"), ("GPTJForCausalLM", "block"), ("OPTForCausalLM", "group:1"),
    ("GPT2LMHeadModel", "model"), ("Gemma2ForCausalLM", "model"), ("Olmo2ForCausalLM", "block"),
    ("GraniteForCausalLM", "model"), ("Qwen2MoeForCausalLM", "model"), ("DeepseekV3ForCausalLM", "block")])
def test_one_pass_refit_equals_rerunning_the_layer(arch, rotations, monkeypatch):
    """Correcting each block's output by Z (W_new - W_old)^T gives the model that running the
    refit layer again gives, on every block shape (sequential, parallel, post-norms, MoE)."""
    import sys

    import slicegpt.running.driver  # noqa: F401  (the drivers that call refit_layer, imported to patch them)
    callers = [m for name, m in list(sys.modules.items())
               if name.startswith("slicegpt.") and getattr(m, "refit_layer", None) is refit_module.refit_layer]
    assert callers
    batches = random_batches(96, count=3, batch=2, seqlen=16)
    batches[1]["attention_mask"][0, -5:] = 0  # padding: those tokens count in no sum
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    logits = []
    for implementation in (refit_module.refit_layer, _three_pass_refit_layer):
        for caller in callers:
            monkeypatch.setattr(caller, "refit_layer", implementation)
        model = make_tiny_model(arch, dtype=torch.float64)
        slice_model(model, None, SliceConfig(sparsity=0.25, rotations=rotations, refit=True), batches,
                    progress=False)
        logits.append(model(ids).logits)
    scale = logits[1].abs().max().item()
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-10 * scale
