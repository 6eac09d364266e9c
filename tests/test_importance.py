"""The importance of every kept linear's inputs (method/importance.py) against hooks on the result."""

import json

import pytest
import torch
from torch import nn

from slicegpt import SliceConfig, slice_model

from conftest import make_tiny_model, random_batches


def measured_squares(model, batches) -> dict[str, torch.Tensor]:
    """Mean squares of every linear's input per column, by hooks on the finished model."""
    sums, counts, handles = {}, {}, []

    def hook(name):
        def add(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return add

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def check_against_hooks(model, result, batches, rtol):
    measured = measured_squares(model, batches)
    linears = {name for name in measured if "shortcut" not in name and not name.endswith(".map")
               and (name in result.importance or name != "lm_head")}
    assert linears <= set(result.importance), sorted(linears - set(result.importance))[:5]
    for name in linears:
        ours = torch.tensor(result.importance[name], dtype=torch.float64)
        torch.testing.assert_close(ours, measured[name], rtol=rtol, atol=1e-6 * measured[name].max().item(),
                                   msg=lambda m: f"{name}: {m}")
    assert result.importance_tokens == sum(int(b["attention_mask"].sum()) for b in batches)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_shared_basis_at_sparsity_zero_equals_hooks(arch):
    """One basis, nothing sliced, no refit: the model is the dense one rotated, so the importance
    taken from the dense pass is what the finished model's linears read (the readers' up to the
    norm's epsilon, which the covariance leaves out: 0.2% on this tiny model's small stream)."""
    model = make_tiny_model(arch, tied=False, dtype=torch.float64)
    batches = random_batches(model.config.vocab_size)
    result = slice_model(model, None, SliceConfig(sparsity=0.0, rotations="model", refit=False, pca="raw"),
                         batches, progress=False)
    check_against_hooks(model, result, batches, rtol=1e-2)


def test_per_block_bases_equal_hooks_when_sliced():
    """Per-block bases run every block as it is kept: its importance is exact at any sparsity (the
    head's up to the final norm's epsilon)."""
    model = make_tiny_model("LlamaForCausalLM", tied=False, dtype=torch.float64)
    batches = random_batches(model.config.vocab_size)
    result = slice_model(model, None, SliceConfig(sparsity=0.25, rotations="block", refit=False), batches,
                         progress=False)
    head = result.importance.pop("lm_head")
    check_against_hooks(model, result, batches, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(head, dtype=torch.float64), measured_squares(model, batches)["lm_head"],
                               rtol=1e-2, atol=0)


def test_shared_sliced_importance_is_close_and_ordered():
    """Sliced with one basis, the readers' importance (from the dense pass) is near what the sliced
    model reads, and the PCA basis puts the large mean squares first."""
    model = make_tiny_model("LlamaForCausalLM", tied=False, dtype=torch.float64)
    batches = random_batches(model.config.vocab_size)
    result = slice_model(model, None, SliceConfig(sparsity=0.25, rotations="model", refit=False), batches,
                         progress=False)
    measured = measured_squares(model, batches)
    q = torch.tensor(result.importance["model.layers.0.self_attn.q_proj"], dtype=torch.float64)
    assert q.shape == measured["model.layers.0.self_attn.q_proj"].shape
    torch.testing.assert_close(q, measured["model.layers.0.self_attn.q_proj"], rtol=0.2, atol=1e-3)
    assert q[:4].mean() > q[-4:].mean()


@pytest.mark.parametrize("rotations", ["model", "block"])
def test_streamed_run_keeps_the_same_importance(tmp_path, rotations):
    import transformers

    from slicegpt.running.streaming import StreamingRun
    from test_streaming import _sharded

    path = _sharded(tmp_path, "LlamaForCausalLM", tied=False)
    config = SliceConfig(sparsity=0.25, rotations=rotations)
    batches = random_batches(96)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = slice_model(model, None, config, batches, progress=False)
    job = StreamingRun(path, tmp_path / "streamed", config, progress=False)
    job.plan(batches)
    streamed = job.run(batches)
    assert streamed.importance.keys() == reference.importance.keys() and streamed.importance
    for name, values in reference.importance.items():
        torch.testing.assert_close(torch.tensor(streamed.importance[name]), torch.tensor(values), rtol=1e-5, atol=1e-7)
    assert streamed.importance_tokens == reference.importance_tokens


def test_shared_bases_hold_the_readers_covariances_only_where_they_fit():
    from slicegpt.method.importance import holds_reader_covariances

    assert holds_reader_covariances(576, 61, None)  # SmolLM2-135M, one basis: 81 MB
    assert not holds_reader_covariances(4096, 65, None)  # a 7B shape, one basis: 4.4 GB
    assert holds_reader_covariances(4096, 65, 1)  # one basis per layer holds three at a time


def padded_batches(vocab: int) -> list[dict]:
    """random_batches with the tail of one sequence padded, so the readers' masks count."""
    batches = random_batches(vocab)
    batches[1]["attention_mask"][0, 11:] = 0
    return batches


@pytest.mark.parametrize("arch,tied,refit", [("LlamaForCausalLM", False, False), ("LlamaForCausalLM", False, True),
                                             ("Qwen2ForCausalLM", True, True), ("PhiForCausalLM", False, False),
                                             ("Gemma2ForCausalLM", True, False)])
def test_readers_past_the_hold_limit_are_measured_in_the_rotation_pass(monkeypatch, arch, tied, refit):
    """Where the readers' covariances would pass the hold limit (lowered here to nothing), the
    rotation pass measures their importance on the dense stream: every reader is there, equal to
    what the held covariances give."""
    import slicegpt.method.importance as importance

    config = SliceConfig(sparsity=0.25, rotations="model", refit=refit, refit_share=1.0)
    batches = padded_batches(96)
    held = slice_model(make_tiny_model(arch, tied=tied), None, config, batches, progress=False)
    monkeypatch.setattr(importance, "HOLD_LIMIT_BYTES", 0)
    measured = slice_model(make_tiny_model(arch, tied=tied), None, config, batches, progress=False)
    assert "lm_head" in held.importance and measured.importance.keys() == held.importance.keys()
    for name, values in held.importance.items():
        torch.testing.assert_close(torch.tensor(measured.importance[name]), torch.tensor(values), rtol=1e-4,
                                   atol=1e-6 * max(values), msg=lambda m: f"{name}: {m}")
    assert measured.importance_tokens == held.importance_tokens == 3 * 2 * 16 - 5


@pytest.mark.parametrize("refit,spill", [(False, "always"), (True, "never")])
def test_streamed_readers_past_the_hold_limit_survive_a_resume(tmp_path, monkeypatch, refit, spill):
    """A streamed run that measures its readers in the rotation pass, stopped after its first layer
    and resumed, has the importance the held covariances give (the dense stream checkpointed,
    spilled to disk or not)."""
    import transformers

    import slicegpt.method.importance as importance
    import slicegpt.running.streamed_store as streamed_store
    from slicegpt.running.streaming import StreamingRun
    from test_streaming import _sharded

    path = _sharded(tmp_path, "LlamaForCausalLM", tied=False)
    config = SliceConfig(sparsity=0.25, rotations="model", refit=refit, refit_share=1.0)
    batches = padded_batches(96)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    held = slice_model(model, None, config, batches, progress=False)
    monkeypatch.setattr(importance, "HOLD_LIMIT_BYTES", 0)

    def stop_after_first_layer(layer, rank):
        if layer == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(streamed_store, "_fault_injection", stop_after_first_layer)
    job = StreamingRun(path, tmp_path / "streamed", config, spill=spill, progress=False)
    job.plan(batches)
    with pytest.raises(KeyboardInterrupt):
        job.run(batches)
    monkeypatch.setattr(streamed_store, "_fault_injection", lambda layer, rank: None)
    job = StreamingRun(path, tmp_path / "streamed", config, spill=spill, progress=False)
    job.plan(batches)
    assert json.loads(job.store.work.state_file.read_text())["next_layer"] == 1
    streamed = job.run(batches)
    assert streamed.importance.keys() == held.importance.keys()
    for name, values in held.importance.items():
        torch.testing.assert_close(torch.tensor(streamed.importance[name]), torch.tensor(values), rtol=1e-4,
                                   atol=1e-6 * max(values), msg=lambda m: f"{name}: {m}")
