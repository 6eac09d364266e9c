"""Recovery fine-tuning: LoRA on the attention and MLP linears, merged into a loadable checkpoint."""

import json
import re

import pytest
import torch

from slicegpt.io.checkpoint import load_sliced
from slicegpt.cli import main
from slicegpt.errors import SliceGPTError

from conftest import TINY_CAL_PPL, WIKITEXT_TEST, WIKITEXT_VALIDATION, make_tiny_model, random_batches

pytest.importorskip("peft")

from slicegpt.recovery import finetune as finetune_module  # noqa: E402

FAST = ["--steps", "6", "--seqlen", "32", "--batch-size", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def finetuned_dir(tiny_sliced_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned") / "rft"
    code = main(["finetune", str(tiny_sliced_dir), "--out", str(out), "--data", str(WIKITEXT_VALIDATION), *FAST,
                 "--eval-ppl", "--ppl-data", str(WIKITEXT_TEST), "--ppl-chunks", "2", "--ppl-seqlen", "64"])
    assert code == 0
    return out


def test_finetuned_checkpoint_loads_and_computes_something_new(tiny_sliced_dir, finetuned_dir):
    before, after = load_sliced(tiny_sliced_dir), load_sliced(finetuned_dir)
    assert after.config.slicing == before.config.slicing
    ids = torch.arange(1, 25).view(2, 12)
    assert (after(ids).logits - before(ids).logits).abs().max() > 1e-4
    # Only the adapted linears moved: shortcuts, embeddings and head are as sliced.
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    for name in old:
        moved = not torch.equal(old[name], new[name])
        adapted = any(part in name for part in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"))
        assert moved == adapted, name


def test_finetune_writes_report_loss_curve_and_card(finetuned_dir):
    report = json.loads((finetuned_dir / "slicing_report.json").read_text())
    rft = report["finetune"]
    assert rft["config"]["steps"] == 6 and rft["config"]["lora"]["r"] == 32
    assert rft["config"]["lora"]["alpha"] == 10 and rft["config"]["lora"]["dropout"] == 0.05
    assert set(rft["ppl"]) == {"before", "after"}
    assert report["ppl"]["sliced"] == pytest.approx(rft["ppl"]["before"])  # the slicing report carries over
    curve = json.loads((finetuned_dir / "loss_curve.json").read_text())
    assert len(curve["loss"]) == 6 and curve["loss"][0] == pytest.approx(rft["loss_first"])
    assert curve["heldout"] == [] and not list(finetuned_dir.parent.glob(".*rft-partial"))  # checkpoints cleared
    for name in ("loss_curve.png", "spectra.png", "variance_kept.png", "zeroshot.png"):
        assert (finetuned_dir / name).read_bytes().startswith(b"\x89PNG"), name
    card = (finetuned_dir / "README.md").read_text()
    assert "## Recovery fine-tuning" in card
    assert f"{rft['ppl']['after']:.3f}" in card and f"{rft['loss_last']:.4f}" in card


def test_lora_targets_are_attention_and_mlp_linears_only(tiny_sliced_dir):
    model = load_sliced(tiny_sliced_dir)
    targets = finetune_module.lora_targets(model)
    assert len(targets) == 2 * 7
    assert not any("shortcut" in t or "lm_head" in t or "embed" in t for t in targets)
    assert "model.layers.1.mlp.down_proj" in targets


def test_lora_targets_follow_each_layers_description():
    """DeepSeek-V3: a dense MLP in layer 0, MoE (fused experts, no linears but the shared expert's) in layer 1."""
    from slicegpt import SliceConfig, slice_model

    model = make_tiny_model("DeepseekV3ForCausalLM")
    slice_model(model, None, SliceConfig(sparsity=0.25), random_batches(96), progress=False)
    targets = finetune_module.lora_targets(model)
    assert "model.layers.0.mlp.gate_proj" in targets and "model.layers.1.mlp.gate_proj" not in targets
    assert "model.layers.1.mlp.shared_experts.down_proj" in targets
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa" in targets


def test_data_without_text_fails_before_training(tiny_sliced_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   \\n"}\n')
    from slicegpt.jobs import recover as job

    monkeypatch.setattr(job, "finetune", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["finetune", str(tiny_sliced_dir), "--out", str(tmp_path / "out"), "--data", str(empty), *FAST])
    assert code == 2
    error = capsys.readouterr().err
    assert "no usable text" in error and str(empty) in error
    assert not (tmp_path / "out").exists()


def test_data_shorter_than_a_sequence_fails(smollm2_tokenizer):
    with pytest.raises(SliceGPTError, match="fewer than one sequence of 512"):
        finetune_module.training_stream(smollm2_tokenizer, ["a few words"], 512, "tiny.txt")


def test_finetune_takes_only_sliced_checkpoints(tiny_model_dir, tmp_path, capsys):
    code = main(["finetune", str(tiny_model_dir), "--out", str(tmp_path / "out"), *FAST])
    assert code == 2
    assert "not a sliced checkpoint" in capsys.readouterr().err


def test_bad_settings_are_refused():
    with pytest.raises(SliceGPTError, match="steps must be at least 1"):
        finetune_module.FinetuneConfig(steps=0)
    with pytest.raises(SliceGPTError, match="lr must be a positive number, got 0"):
        finetune_module.FinetuneConfig(lr=0)


@pytest.mark.parametrize("settings,message", [
    (dict(lr=float("inf")), "lr must be a positive number, got inf"),
    (dict(lora_alpha=-1), "lora_alpha must be a positive number, got -1"),
    (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1), got 1"),
    (dict(seqlen=1), "seqlen must be at least 2, got 1"),
    (dict(seed=2**64), "seed must be a 64-bit integer (from -2**63 to 2**63 - 1), got 18446744073709551616"),
    (dict(heldout_fraction=0.1), "eval_every must be at least 1, got 0, to measure the held-out text that "
                                 "heldout_fraction asks for"),
    (dict(heldout_data="lambada.jsonl", eval_every=0), "eval_every must be at least 1, got 0"),
])
def test_settings_out_of_range_are_refused(settings, message):
    """The same rules the CLI applies to its flags (tests/test_bad_input.py), with the fields' names."""
    with pytest.raises(SliceGPTError, match=re.escape(message)):
        finetune_module.FinetuneConfig(**settings)


def test_texts_must_be_lists_and_heldout_texts_measured():
    config = finetune_module.FinetuneConfig(steps=1, seqlen=16, batch_size=1)
    model, texts = make_tiny_model("LlamaForCausalLM"), _tiny_stream_texts()
    with pytest.raises(TypeError, match="texts must be a list of strings, got one str .wrap one text in a list"):
        finetune_module.finetune(model, _Tokenizer(), texts[0], config, progress=False)
    with pytest.raises(TypeError, match=r"heldout_texts\[1\] must be a string, got dict"):
        finetune_module.finetune(model, _Tokenizer(), texts, config, progress=False,
                                 heldout_texts=[texts[0], {"text": "a row"}])
    with pytest.raises(SliceGPTError, match="heldout_texts are measured every eval_every steps"):
        finetune_module.finetune(model, _Tokenizer(), texts, config, progress=False, heldout_texts=texts)


def test_checkpoint_keeps_every_gpus_random_state(tmp_path, monkeypatch):
    """Dropout on a GPU draws from that GPU's generator, so a resumed run restores it too (CUDA mocked:
    two GPUs when saved, the same two when resumed, then one)."""
    from slicegpt.recovery.checkpoint import load_state, save_state

    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored, visible = [], [2]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state.clone() for state in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    layer = torch.nn.Linear(2, 2)
    named, optimizer = {"weight": layer.weight}, torch.optim.AdamW([layer.weight])
    save_state(tmp_path, 3, named, optimizer, torch.Generator(), {"losses": []}, {"lr": 1})
    assert load_state(tmp_path, named, optimizer, torch.Generator(), {"lr": 1})[0] == 3
    visible[0] = 1
    load_state(tmp_path, named, optimizer, torch.Generator(), {"lr": 1})
    assert [len(given) for given in restored] == [2, 1]
    assert all(torch.equal(a, b) for a, b in zip(restored[0], states)) and torch.equal(restored[1][0], states[0])


def test_plain_export_can_be_finetuned(tiny_model_dir, tmp_path):
    """A plain export has no config.slicing; the adapters find their linears through the family registry."""
    from slicegpt.io.models import load_model

    plain = tmp_path / "plain"
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--rotations", "model", "--plain",
                 "--out", str(plain), *TINY_CAL_PPL]) == 0
    tuned = tmp_path / "tuned"
    assert main(["finetune", str(plain), "--out", str(tuned), "--data", str(WIKITEXT_VALIDATION), *FAST]) == 0
    before, _ = load_model(str(plain))
    after, _ = load_model(str(tuned))
    assert not hasattr(after.config, "slicing") and type(after) is type(before)
    ids = torch.arange(1, 13).view(1, 12)
    assert (after(ids).logits - before(ids).logits).abs().max() > 1e-4
    assert "## Recovery fine-tuning" in (tuned / "README.md").read_text()


def _tiny_stream_texts():
    return [" ".join(f"w{i % 50}" for i in range(3000))]


class _Tokenizer:
    """Whitespace words mod the tiny vocabulary: enough text for training windows, no files."""

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [sum(map(ord, word)) % 90 + 1 for word in text.split()]}


def test_stopped_finetune_resumes_to_the_same_weights(tiny_sliced_dir, tmp_path, monkeypatch):
    config = finetune_module.FinetuneConfig(steps=5, seqlen=16, batch_size=2, lr=1e-3, heldout_fraction=0.2,
                                            heldout_windows=4, eval_every=2)
    texts = _tiny_stream_texts()
    tokenizer = _Tokenizer()
    whole, record = finetune_module.finetune(load_sliced(tiny_sliced_dir), tokenizer, texts, config, progress=False)
    assert [p["step"] for p in record["heldout_losses"]] == [0, 2, 4, 5]

    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def stop_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune_module.finetune(load_sliced(tiny_sliced_dir), tokenizer, texts, config, progress=False,
                                 checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    assert (tmp_path / "ckpt" / "rft_checkpoint.safetensors").is_file()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    resumed, again = finetune_module.finetune(load_sliced(tiny_sliced_dir), tokenizer, texts, config, progress=False,
                                              checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    assert again["losses"] == pytest.approx(record["losses"], abs=1e-6)
    assert [p["step"] for p in again["heldout_losses"]] == [0, 2, 4, 5]
    assert [p["loss"] for p in again["heldout_losses"]] == pytest.approx([p["loss"] for p in record["heldout_losses"]])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name

    other = finetune_module.FinetuneConfig(**{**config.to_dict(), "lr": 2e-3})
    with pytest.raises(SliceGPTError, match="other settings .*lr"):
        finetune_module.finetune(load_sliced(tiny_sliced_dir), tokenizer, texts, other, progress=False,
                                 checkpoint_dir=tmp_path / "ckpt")


def test_heldout_needs_enough_text():
    config = finetune_module.FinetuneConfig(seqlen=16, heldout_fraction=0.01, eval_every=1)
    with pytest.raises(SliceGPTError, match="too little text to hold out"):
        finetune_module.split_heldout(torch.arange(100), config)
