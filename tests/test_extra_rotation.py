"""One more rotation of a plain model's stream (method/extra_rotation.py): exact, and carried to the imatrix."""

import pytest
import torch

from slicegpt import SliceConfig, SliceGPTError, slice_model
from slicegpt.architectures.families import family_for, family_of_sliced
from slicegpt.architectures.plain import to_plain_model
from slicegpt.method.extra_rotation import (extra_rotation, hadamard, plain_family, rotate_importance,
                                            rotate_plain_model)

from conftest import make_tiny_model, random_batches


@pytest.mark.parametrize("width,kind", [(64, "hadamard"), (48, "random"), (96, "random")])
def test_rotation_is_orthogonal(width, kind):
    R, used = extra_rotation(width, seed=3)
    assert used == kind
    torch.testing.assert_close(R.T @ R, torch.eye(width, dtype=torch.float64), atol=1e-12, rtol=0)
    again, _ = extra_rotation(width, seed=3)
    assert torch.equal(R, again)
    if kind == "hadamard":
        assert torch.allclose(R.abs(), torch.full_like(R, width ** -0.5))


def test_hadamard_needs_a_power_of_two():
    assert torch.equal(hadamard(4) @ hadamard(4).T, 4 * torch.eye(4, dtype=torch.float64))
    with pytest.raises(SliceGPTError, match="power-of-two"):
        extra_rotation(48, kind="hadamard")


@pytest.mark.parametrize("arch,sparsity,tied", [("LlamaForCausalLM", 0.25, False), ("Qwen2ForCausalLM", 0.0, False),
                                                ("LlamaForCausalLM", 0.5, True)])
def test_logits_unchanged(arch, sparsity, tied):
    """Folded into a plain model (sliced, or at sparsity 0), the rotation leaves the logits as they were."""
    model = make_tiny_model(arch, tied=tied, dtype=torch.float64)
    slice_model(model, None, SliceConfig(sparsity=sparsity, rotations="model"), random_batches(96),
                progress=False)
    plain = to_plain_model(model, family_of_sliced(model))
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        before = plain(ids).logits
    family = plain_family(plain)
    R, _ = extra_rotation(plain.config.hidden_size, seed=1)
    weight = plain.model.layers[0].self_attn.q_proj.weight.clone()
    rotate_plain_model(plain, family, R)
    assert not torch.allclose(weight, plain.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        after = plain(ids).logits
    # transformers' RMSNorm computes in float32 even for float64 weights: float32 rounding is the floor.
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
    assert (after - before).abs().max() < 1e-6 * before.abs().max()


def test_refuses_norms_with_a_scale_vector():
    model = make_tiny_model("LlamaForCausalLM", dtype=torch.float64)  # random norm scales, not folded
    with pytest.raises(SliceGPTError, match="one scale"):
        rotate_plain_model(model, family_for(model), extra_rotation(64)[0])


def test_importance_follows_the_readers_only():
    model = make_tiny_model("LlamaForCausalLM", dtype=torch.float64)
    family = family_for(model)
    R, _ = extra_rotation(64, seed=0)
    importance = {"model.layers.0.self_attn.q_proj": torch.arange(64.0), "model.layers.0.mlp.down_proj": torch.ones(112),
                  "lm_head": torch.zeros(64).index_fill_(0, torch.tensor([0]), 64.0)}
    rotated = rotate_importance(importance, model, family, R)
    assert torch.equal(rotated["model.layers.0.mlp.down_proj"], importance["model.layers.0.mlp.down_proj"])
    assert rotated["model.layers.0.self_attn.q_proj"].sum().item() == pytest.approx(sum(range(64)), rel=1e-6)
    # A Hadamard spreads one coordinate's energy evenly over all of them.
    torch.testing.assert_close(rotated["lm_head"], torch.ones(64), atol=1e-5, rtol=0)


def test_gguf_export_with_rotation(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from slicegpt.cli import main
    from test_imatrix import quantizable_slice

    directory, _ = quantizable_slice(tmp_path)
    plain_out, rotated_out = tmp_path / "plain.gguf", tmp_path / "rotated.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--out", str(plain_out)]) == 0
    assert main(["export", str(directory), "--format", "gguf", "--out", str(rotated_out), "--rotate", "auto"]) == 0
    plain = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(plain_out).tensors}
    rotated = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(rotated_out).tensors}
    assert not np.allclose(plain["blk.0.attn_q.weight"], rotated["blk.0.attn_q.weight"], atol=1e-3)
    np.testing.assert_array_equal(plain["blk.0.attn_norm.weight"], rotated["blk.0.attn_norm.weight"])
    from slicegpt.io.imatrix import read_imatrix

    before, after = read_imatrix(tmp_path / "plain.imatrix.gguf"), read_imatrix(tmp_path / "rotated.imatrix.gguf")
    assert np.isclose(before["blk.0.attn_q.weight"].sum(), after["blk.0.attn_q.weight"].sum(), rtol=1e-4)
    assert after["blk.0.attn_q.weight"].std() < before["blk.0.attn_q.weight"].std()
    np.testing.assert_allclose(before["blk.0.ffn_down.weight"], after["blk.0.ffn_down.weight"])
