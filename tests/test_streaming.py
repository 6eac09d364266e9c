"""Streaming mode: layer-at-a-time slicing from sharded safetensors equals the in-memory run."""

import dataclasses
import json

import pytest
import torch
import transformers

from slicegpt import SliceConfig, load_sliced, save_sliced, slice_model
from slicegpt.cli import main
from slicegpt.errors import SliceGPTError
from slicegpt.architectures.family import get_module
from slicegpt.io.shards import INDEX_FILE
from slicegpt.running.streaming import StreamingRun, partial_dir

from conftest import WIKITEXT_VALIDATION, make_tiny_model, random_batches

CAL = ["--cal-data", str(WIKITEXT_VALIDATION), "--cal-samples", "4", "--cal-seqlen", "32", "--cal-batch-size", "2"]


def _sharded(tmp_path, arch="LlamaForCausalLM", tied=False, name="dense"):
    model = make_tiny_model(arch, tied=tied)
    path = tmp_path / name
    model.save_pretrained(path, max_shard_size="30KB")  # several shards, layers split across them
    assert (path / INDEX_FILE).exists()
    return path


def _in_memory(path, config, batches, out):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    slice_model(model, None, config, batches, progress=False)
    save_sliced(model, None, out)
    return load_sliced(out)


def _streamed(path, config, batches, out, **options):
    job = StreamingRun(path, out, config, progress=False, **options)
    job.plan(batches)
    job.run(batches)
    job.finish(None)
    return load_sliced(out)


def _assert_same(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert torch.allclose(sa[key], sb[key], rtol=0, atol=atol), (key, (sa[key] - sb[key]).abs().max())
    ids = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a(ids).logits, b(ids).logits, rtol=0, atol=max(atol, 1e-6))


def _assert_streams_as_in_memory(tmp_path, arch, tied, settings, spill="auto"):
    """The streamed output equals the in-memory output, tensors and metadata, and leaves no partial folder."""
    path = _sharded(tmp_path, arch, tied)
    config = SliceConfig(**{"sparsity": 0.25, **settings})
    batches = random_batches(96)
    reference = _in_memory(path, config, batches, tmp_path / "memory")
    streamed = _streamed(path, config, batches, tmp_path / "streamed", spill=spill)
    _assert_same(reference, streamed)
    assert streamed.config.slicing == reference.config.slicing
    assert not partial_dir(tmp_path / "streamed").exists()


@pytest.mark.parametrize("arch,tied,spill", [("LlamaForCausalLM", False, "never"), ("LlamaForCausalLM", True, "never"),
                                              ("LlamaForCausalLM", True, "always"), ("Qwen2ForCausalLM", False, "always"),
                                              ("Gemma3ForCausalLM", True, "never"), ("Olmo2ForCausalLM", True, "never")])
def test_streamed_equals_in_memory(tmp_path, arch, tied, spill):
    path = _sharded(tmp_path, arch, tied)
    config = SliceConfig(sparsity=0.25)
    batches = random_batches(96)
    reference = _in_memory(path, config, batches, tmp_path / "memory")
    streamed = _streamed(path, config, batches, tmp_path / "streamed", spill=spill)
    _assert_same(reference, streamed)
    assert not partial_dir(tmp_path / "streamed").exists()
    assert not list((tmp_path / "streamed").glob("*.bin")), "spill files must not reach the output"
    index = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())
    assert index["metadata"]["total_parameters"] == sum(p.numel() for p in streamed.parameters())


@pytest.mark.parametrize("arch,rotations", [("OPTForCausalLM", "block"), ("GPT2LMHeadModel", "auto"),
                                            ("PhiForCausalLM", "group:2"), ("FalconForCausalLM:two_norms", "block"),
                                            ("CohereForCausalLM", "model")])
def test_streamed_tied_layernorm_equals_in_memory(tmp_path, arch, rotations):
    """A tied LayerNorm model keeps its head tied (the mean axis) streamed as in memory."""
    path = _sharded(tmp_path, arch, tied=True)
    config = SliceConfig(sparsity=0.25, rotations=rotations)
    batches = random_batches(96)
    reference = _in_memory(path, config, batches, tmp_path / "memory")
    streamed = _streamed(path, config, batches, tmp_path / "streamed")
    _assert_same(reference, streamed)
    assert streamed.config.slicing == reference.config.slicing
    assert streamed.config.slicing["tied_head"] and streamed.config.slicing["mean_axis"]
    assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight


@pytest.mark.parametrize("settings", [dict(target_ratio=0.8),
                                      dict(sparsity=0.25, tied_head_basis="input"), dict(sparsity=0.25, tied_head=False)])
def test_streamed_equals_in_memory_with_options(tmp_path, settings):
    path = _sharded(tmp_path, tied=True)
    config = SliceConfig(**settings)
    batches = random_batches(96)
    reference = _in_memory(path, config, batches, tmp_path / "memory")
    _assert_same(reference, _streamed(path, config, batches, tmp_path / "streamed"))


@pytest.mark.parametrize("arch,tied,settings,spill", [
    ("LlamaForCausalLM", True, dict(rotations="model"), "never"),
    ("LlamaForCausalLM", True, dict(rotations="model", target_ratio=0.8), "always"),
    ("LlamaForCausalLM", False, dict(rotations="layer"), "never"),
    ("LlamaForCausalLM", True, dict(rotations="group:2", tied_head_basis="input"), "never"),
    ("Qwen2ForCausalLM", False, dict(rotations="model", pca="normalized"), "always"),
    ("Gemma2ForCausalLM", True, dict(rotations="layer"), "never"),
    ("Olmo2ForCausalLM", False, dict(rotations="model"), "never"),
])
def test_streamed_shared_rotations_equal_in_memory(tmp_path, arch, tied, settings, spill):
    _assert_streams_as_in_memory(tmp_path, arch, tied, settings, spill)


@pytest.mark.parametrize("arch", ["GraniteForCausalLM", "FalconForCausalLM", "FalconForCausalLM:sequential",
                                  "GptOssForCausalLM", "DeepseekV3ForCausalLM"])
@pytest.mark.parametrize("rotations", ["block", "model"])
def test_streamed_recent_families_equal_in_memory(tmp_path, arch, rotations):
    """Families whose layers need more than names: a branch scale folded (Granite), layers that
    return tuples (Falcon), experts stored (experts, in, out) (gpt-oss), dense layers before MoE ones
    (DeepSeek-V3, saved one tensor per expert)."""
    path = _sharded(tmp_path, arch)
    config = SliceConfig(sparsity=0.25, rotations=rotations)
    batches = random_batches(96)
    reference = _in_memory(path, config, batches, tmp_path / "memory")
    _assert_same(reference, _streamed(path, config, batches, tmp_path / "streamed"))


@pytest.mark.parametrize("arch,tied,settings,spill", [
    ("LlamaForCausalLM", True, dict(widths="variance", rotations="block"), "never"),
    ("Qwen2ForCausalLM", False, dict(widths="variance", rotations="group:2"), "always"),
    ("LlamaForCausalLM", True, dict(refit=True, rotations="block"), "always"),
    ("LlamaForCausalLM", False, dict(refit=True, rotations="model"), "never"),
    ("Qwen2ForCausalLM", True, dict(refit=True, rotations="model", widths="variance"), "always"),
    ("OPTForCausalLM", True, dict(refit=True, rotations="block"), "never"),
    ("PhiForCausalLM", True, dict(refit=True, rotations="model"), "always"),
    ("Gemma3ForCausalLM", True, dict(refit=True, rotations="block"), "never"),
    ("MixtralForCausalLM", False, dict(refit=True, rotations="layer"), "never"),
    ("LlamaForCausalLM", True, dict(refit=True, rotations="model", basis_share=0.5), "always"),
    ("Qwen2ForCausalLM", False, dict(refit=True, rotations="group:2", refit_share=0.5), "always"),
])
def test_streamed_refit_and_variance_widths_equal_in_memory(tmp_path, arch, tied, settings, spill):
    """The options that need the dense stream (the refit) or every spectrum first (variance
    widths) run streamed too, with the same driver, and give the in-memory tensors."""
    _assert_streams_as_in_memory(tmp_path, arch, tied, settings, spill)


def test_loads_with_remote_code(tmp_path):
    path = _sharded(tmp_path, tied=True)
    config = SliceConfig(sparsity=0.25)
    streamed = _streamed(path, config, random_batches(96), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["SlicedLlamaForCausalLM"]
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    _assert_same(streamed, remote)


@pytest.mark.parametrize("rotations,reads", [("block", [[], [0], [1], []]),
                                             ("model", [[], [0], [1], [0], [1], []])])  # two passes
def test_one_layer_in_memory_at_a_time(tmp_path, monkeypatch, rotations, reads):
    """The memory bound: never more than one decoder layer holds real weights."""
    path = _sharded(tmp_path)
    job = StreamingRun(path, tmp_path / "out", SliceConfig(sparsity=0.25, rotations=rotations), progress=False)
    seen = []
    original = job.store._materialize

    def watching(module_path, **kwargs):
        original(module_path, **kwargs)
        layers = get_module(job.model, job.family.layers)
        real = [i for i, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())]
        seen.append(real)

    monkeypatch.setattr(job.store, "_materialize", watching)
    batches = random_batches(96)
    job.plan(batches)
    job.run(batches)
    assert seen == reads  # globals, each layer alone, the head


def test_spilled_activations_stay_on_disk(tmp_path):
    from slicegpt.running.spill import DiskActivations

    store = DiskActivations(tmp_path, masks=[None, None])
    batches = [torch.randn(2, 5, 8), torch.randn(1, 5, 8)]
    store.hidden = batches
    assert torch.equal(store.hidden[1], batches[1])
    first = store.file
    store.map(lambda x: x[..., :4] * 2)
    assert not first.exists() and store.file.exists()
    assert [tuple(x.shape) for x in store.hidden] == [(2, 5, 4), (1, 5, 4)]
    assert torch.equal(store.hidden[0], batches[0][..., :4] * 2)
    pinned = store.pin()
    store.map(lambda x: x + 1)
    assert (tmp_path / pinned["file"]).exists(), "a checkpoint's file survives the next map"
    store.release()
    assert not (tmp_path / pinned["file"]).exists()
    store.discard()
    assert list(tmp_path.iterdir()) == []


def test_cli_streaming_matches_in_memory(tiny_model_dir, tmp_path, capsys):
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / "mem"), *CAL]) == 0
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / "str"), *CAL,
                 "--streaming"]) == 0
    assert "streaming mode" in capsys.readouterr().err
    _assert_same(load_sliced(tmp_path / "mem"), load_sliced(tmp_path / "str"))
    report = json.loads((tmp_path / "str" / "slicing_report.json").read_text())
    memory_report = json.loads((tmp_path / "mem" / "slicing_report.json").read_text())
    assert report["params"] == memory_report["params"]
    assert report["widths"] == memory_report["widths"]
    for key in ("rotations", "pca", "target_params"):  # the settings auto chose, the same in both
        assert report["config"][key] == memory_report["config"][key] != "auto", key
    assert (tmp_path / "str" / "tokenizer.json").exists()


def test_streaming_is_chosen_when_memory_is_short(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from slicegpt.commands import slice as slice_command

    monkeypatch.setattr(slice_command, "available_memory", lambda device="cpu": 1000)
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / "o"), *CAL]) == 0
    assert "streaming mode: slicing in memory would need about" in capsys.readouterr().err
    assert (tmp_path / "o" / INDEX_FILE).exists()


def test_streamed_run_measures_and_converts_its_output(tiny_model_dir, tmp_path, capsys):
    """--eval-ppl and --plain after a streamed run work from the written output, as in memory."""
    from conftest import WIKITEXT_TEST

    flags = ["--rotations", "model", "--plain", "--eval-ppl", "--ppl-data", str(WIKITEXT_TEST), "--ppl-chunks", "1",
             "--ppl-seqlen", "64"]
    for name, engine in (("mem", "--no-streaming"), ("str", "--streaming")):
        assert main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / name), *CAL,
                     *flags, engine]) == 0
    reports = {name: json.loads((tmp_path / name / "slicing_report.json").read_text()) for name in ("mem", "str")}
    assert reports["str"]["ppl"]["dense"] == pytest.approx(reports["mem"]["ppl"]["dense"], rel=1e-6)
    assert reports["str"]["ppl"]["sliced"] == pytest.approx(reports["mem"]["ppl"]["sliced"], rel=1e-5)
    assert reports["str"]["params"] == reports["mem"]["params"]
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "str")  # no remote code
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert "perplexity" in (tmp_path / "str" / "README.md").read_text().lower()


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_not_enough_disk_is_refused_before_work(tiny_model_dir, tmp_path, capsys, monkeypatch, streaming):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("slicegpt.running.resources.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    for name in ("slicegpt.running.in_memory.slice_layers", "slicegpt.running.streaming.slice_layers"):
        monkeypatch.setattr(name, lambda *a, **k: pytest.fail("work started"))
    code = main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / "o"), *CAL, streaming])
    err = capsys.readouterr().err
    assert code == 2 and "not enough disk space" in err and "only 0.00 GiB is free" in err, err
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()
    assert shutil.disk_usage  # the real one is untouched outside slicegpt.running.resources


def test_missing_shard_is_reported(tmp_path):
    path = _sharded(tmp_path)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(SliceGPTError, match="missing"):
        StreamingRun(path, tmp_path / "out", SliceConfig(sparsity=0.25))


# A tensor name each checkpoint holds as `save_pretrained` writes it (the hub's layout), which the
# model itself does not have: transformers converts these only when it loads a model.
HUB_LAYOUT_KEYS = {
    "MixtralForCausalLM": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
    "Qwen2MoeForCausalLM": "model.layers.1.mlp.experts.3.up_proj.weight",
    "Qwen3MoeForCausalLM": "model.layers.1.mlp.experts.3.gate_proj.weight",
    "GPTNeoXForCausalLM": "embed_out.weight",
}


@pytest.mark.parametrize("arch,settings", [
    ("MixtralForCausalLM", dict()),
    ("Qwen2MoeForCausalLM", dict()),
    ("Qwen3MoeForCausalLM", dict()),
    ("Qwen2MoeForCausalLM", dict(rotations="model")),
    ("GPTNeoXForCausalLM", dict()),
])
def test_hub_layout_checkpoints_stream_as_in_memory(tmp_path, arch, settings):
    path = _sharded(tmp_path, arch)
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    model_names = dict(make_tiny_model(arch).named_parameters())
    assert HUB_LAYOUT_KEYS[arch] in weight_map and HUB_LAYOUT_KEYS[arch] not in model_names
    config = SliceConfig(sparsity=0.25, **settings)
    batches = random_batches(96)
    reference = _in_memory(path, config, batches, tmp_path / "memory")
    _assert_same(reference, _streamed(path, config, batches, tmp_path / "streamed"))


def test_model_layout_checkpoints_still_stream(tmp_path):
    """A checkpoint already under the model's own names (fused experts) needs no conversion."""
    path = tmp_path / "dense"
    make_tiny_model("MixtralForCausalLM").save_pretrained(path, max_shard_size="30KB", save_original_format=False)
    assert "model.layers.1.mlp.experts.gate_up_proj" in json.loads((path / INDEX_FILE).read_text())["weight_map"]
    config, batches = SliceConfig(sparsity=0.25), random_batches(96)
    reference = _in_memory(path, config, batches, tmp_path / "memory")
    _assert_same(reference, _streamed(path, config, batches, tmp_path / "streamed"))


def test_converted_reads_touch_only_the_layer(tmp_path, monkeypatch):
    """Fused expert tensors are built from that layer's per-expert tensors, and from no others."""
    from slicegpt.io.converted import ConvertedCheckpoint
    from slicegpt.io.shards import SafetensorsCheckpoint

    path = _sharded(tmp_path, "MixtralForCausalLM")
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    checkpoint = SafetensorsCheckpoint(path)
    tensors = ConvertedCheckpoint(checkpoint, dense)
    read, original = [], checkpoint.read
    monkeypatch.setattr(checkpoint, "read", lambda names: read.extend(names) or original(names))
    wanted = [n for n, _ in dense.named_parameters() if n.startswith("model.layers.1.")]
    found = tensors.read(wanted)
    assert read and all(key.startswith("model.layers.1.") for key in read)
    assert len(read) == len(set(read)) == 4 * 3 + 1 + 4 + 2  # experts w1/w2/w3, router, attention, norms
    for name in wanted:
        assert torch.equal(found[name], dense.get_parameter(name)), name
    with pytest.raises(SliceGPTError, match="no tensor for model.layers.1.mlp.experts.nothing"):
        tensors.read(["model.layers.1.mlp.experts.nothing"])


def test_basis_share_fixes_the_bases_on_fewer_sequences(tmp_path):
    path = _sharded(tmp_path)
    batches = random_batches(96)
    no_refit = dict(sparsity=0.25, rotations="model", refit=False)
    every = _in_memory(path, SliceConfig(**no_refit), batches, tmp_path / "every")
    share = _in_memory(path, SliceConfig(**no_refit, basis_share=0.3), batches, tmp_path / "s")
    first = _in_memory(path, SliceConfig(**no_refit), batches[:1], tmp_path / "first")
    _assert_same(share, first)  # 0.3 of three batches: the first one alone
    assert not torch.equal(every.state_dict()["model.embed_tokens.weight"], share.state_dict()["model.embed_tokens.weight"])
    with pytest.raises(SliceGPTError, match="basis-share"):
        SliceConfig(basis_share=0.0)


def test_refit_share_fits_on_fewer_sequences_with_the_same_bases(tmp_path):
    path = _sharded(tmp_path)
    batches = random_batches(96)
    config = SliceConfig(sparsity=0.25, rotations="model", refit=True, refit_share=1.0)
    every = _in_memory(path, config, batches, tmp_path / "every")
    share = _in_memory(path, dataclasses.replace(config, refit_share=0.3), batches, tmp_path / "share")
    weights, shared = every.state_dict(), share.state_dict()
    assert torch.equal(weights["model.embed_tokens.weight"], shared["model.embed_tokens.weight"])  # same bases
    assert not torch.equal(weights["model.layers.0.mlp.down_proj.weight"], shared["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(SliceGPTError, match="refit-share"):
        SliceConfig(refit_share=1.5)
