"""The sliced layer's fast paths compute what the plain formulas say."""

import pytest
import torch
from torch import nn

from slicegpt.architectures.modeling_sliced import SlicedDecoderLayer, SlicedRMSNorm


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_norm_divides_by_the_dense_width(dtype, tol):
    norm = SlicedRMSNorm(dense_width=96, eps=1e-5)
    x = torch.randn(3, 5, 72, dtype=dtype)
    y = x.double()
    expected = y / torch.sqrt(y.pow(2).sum(-1, keepdim=True) / 96 + 1e-5)
    assert norm(x).dtype == dtype
    assert torch.allclose(norm(x).double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(1, 1, 24), (4, 7, 24)])
def test_fused_residual_equals_linear_plus_add(shape):
    shortcut = nn.Linear(24, 16, bias=False).double()
    x, out = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape[:-1], 16, dtype=torch.float64)
    expected = shortcut(x) + out
    assert torch.allclose(SlicedDecoderLayer._residual(shortcut, x, out.clone()), expected, atol=1e-12)
    assert torch.equal(SlicedDecoderLayer._residual(None, x, x), 2 * x)


def test_hooked_shortcut_runs_as_a_module():
    """LoRA and friends wrap or hook linears: the fused path must not bypass them."""
    shortcut = nn.Linear(8, 8, bias=False)
    calls = []
    shortcut.register_forward_hook(lambda module, args, output: calls.append(1))
    x, out = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.allclose(SlicedDecoderLayer._residual(shortcut, x, out), shortcut(x) + out)
    assert len(calls) == 2


def test_fused_residual_has_gradients():
    shortcut = nn.Linear(8, 8, bias=False)
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = (x * 2).sum(-1, keepdim=True).expand(2, 3, 8)
    SlicedDecoderLayer._residual(shortcut, x, out * 1.0).sum().backward()
    reference = x.detach().clone().requires_grad_()
    (shortcut(reference) + (reference * 2).sum(-1, keepdim=True).expand(2, 3, 8)).sum().backward()
    assert torch.allclose(x.grad, reference.grad)
    assert shortcut.weight.grad is not None


def test_sliced_norm_compiles_once():
    """torch.compile must not guard on the norm's gain cache (it recompiled on every new entry)."""
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    norm = torch.compile(SlicedRMSNorm(64, 1e-6), backend=counting_backend)
    x = torch.randn(2, 5, 48)
    first = norm(x)
    for _ in range(3):
        assert torch.equal(norm(x), first)
    assert len(graphs) == 1
    assert torch.allclose(first, SlicedRMSNorm(64, 1e-6)(x))
