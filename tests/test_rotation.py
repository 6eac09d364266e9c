"""The numeric pieces on their own: one orientation rule covers linears, routers and fused experts."""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from slicegpt.architectures.families import LLAMA
from slicegpt.method.fusion import centre_output, fold_into_linears
from slicegpt.architectures.modeling_sliced import conv1d_as_linear, family_fields, stream_weight
from slicegpt.method.rotation import rotate_input, rotate_output

D, E, INNER = 8, 3, 5


def _orthogonal(n=D, seed=0):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


class Experts(nn.Module):
    """Fused expert tensors as transformers 5 stores them: (experts, out, in)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INNER, D, dtype=torch.float64))
        self.down_proj = nn.Parameter(torch.randn(E, D, INNER, dtype=torch.float64))
        self.down_proj_bias = nn.Parameter(torch.randn(E, D, dtype=torch.float64))


def test_stream_weight_finds_modules_and_bare_parameters():
    root = nn.Module()
    root.experts = Experts()
    root.proj = nn.Linear(D, D)
    assert stream_weight(root, "proj").bias_name == "bias"
    assert stream_weight(root, "experts.gate_up_proj").bias_name is None
    assert stream_weight(root, "experts.down_proj").bias_name == "down_proj_bias"


def test_rotating_fused_experts_rotates_every_expert():
    experts, Q = Experts(), _orthogonal()
    x, h = torch.randn(4, D, dtype=torch.float64), torch.randn(4, INNER, dtype=torch.float64)
    before_in = [F.linear(x, experts.gate_up_proj[e]) for e in range(E)]
    before_out = [F.linear(h, experts.down_proj[e], experts.down_proj_bias[e]) for e in range(E)]
    rotate_input(stream_weight(experts, "gate_up_proj"), Q)
    rotate_output(stream_weight(experts, "down_proj"), Q)
    for e in range(E):
        # Reads the rotated stream x Q and gives the same; writes the same output, rotated.
        torch.testing.assert_close(F.linear(x @ Q, experts.gate_up_proj[e]), before_in[e])
        torch.testing.assert_close(F.linear(h, experts.down_proj[e], experts.down_proj_bias[e]), before_out[e] @ Q)


def test_slicing_a_linear_keeps_its_width_attributes_true():
    linear = nn.Linear(D, D, dtype=torch.float64)
    root = nn.Module()
    root.proj = linear
    rotate_input(stream_weight(root, "proj"), _orthogonal()[:, :6])
    rotate_output(stream_weight(root, "proj"), _orthogonal(seed=1)[:, :4])
    assert (linear.in_features, linear.out_features) == (6, 4) and linear.bias.shape == (4,)


def test_fold_into_fused_experts():
    experts = Experts()
    scale = torch.rand(D, dtype=torch.float64) + 0.5
    x = torch.randn(4, D, dtype=torch.float64)
    before = [F.linear(x * scale, experts.gate_up_proj[e]) for e in range(E)]
    fold_into_linears(scale, None, [stream_weight(experts, "gate_up_proj")])
    for e in range(E):
        torch.testing.assert_close(F.linear(x, experts.gate_up_proj[e]), before[e])


def test_fold_shift_gives_a_bias_free_linear_a_bias():
    root = nn.Module()
    root.head = nn.Linear(D, 5, bias=False, dtype=torch.float64)
    scale, shift = torch.rand(D, dtype=torch.float64) + 0.5, torch.randn(D, dtype=torch.float64)
    x = torch.randn(4, D, dtype=torch.float64)
    before = root.head(x * scale + shift)
    assert fold_into_linears(scale, shift, [stream_weight(root, "head")]) == [0]
    torch.testing.assert_close(root.head(x), before)


def test_centre_output_writes_mean_free():
    root = nn.Module()
    root.out = nn.Linear(INNER, D, dtype=torch.float64)
    centre_output(stream_weight(root, "out"))
    y = root.out(torch.randn(4, INNER, dtype=torch.float64))
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, dtype=torch.float64))


def test_conv1d_becomes_an_equal_linear():
    conv = Conv1D(7, D)  # (out, in) arguments; weight stored (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(conv1d_as_linear(conv)(x), conv(x))


def test_format_1_family_dicts_still_load():
    old = LLAMA.to_dict()
    for key in ("attn", "mlp"):
        old[f"{key}_output"] = old.pop(f"{key}_outputs")[0]
    for key in ("mlp_chain", "mlp_width_attrs", "mlp_keeps_width", "conv1d", "layer_args"):
        del old[key]
    upgraded = family_fields(old)
    assert upgraded["attn_outputs"] == ("self_attn.o_proj",) and upgraded["mlp_outputs"] == ("mlp.down_proj",)
    assert upgraded["conv1d"] is False and upgraded["layer_args"] == ()


def test_a_tall_reader_rotates_a_slice_of_rows_at_a_time(monkeypatch):
    """Embedding tables are rotated in row slices (no whole float64 copy); the result is the
    product of the whole table, in the table's dtype."""
    import slicegpt.method.rotation as rotation

    monkeypatch.setattr(rotation, "ROWS_PER_PRODUCT", 7)
    table = nn.Embedding(30, D)
    Q = _orthogonal()[:, :5]
    expected = (table.weight.double() @ Q).float()
    rotate_input(stream_weight(table, "weight"), Q)
    assert table.weight.dtype == torch.float32 and table.weight.shape == (30, 5)
    assert torch.equal(table.weight, expected)
