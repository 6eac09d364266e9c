"""`--widths embedding`: only the embeddings (and a tied head) are sliced; every layer keeps
its width and its weights, with one map from the embedding basis into the stream."""

import pytest
import torch
import transformers

from slicegpt import SliceConfig, load_sliced, save_sliced, slice_model
from slicegpt.architectures.families import family_for
from slicegpt.errors import SliceGPTError
from slicegpt.sizing.budget import predicted_parameters, uniform_widths
from slicegpt.sizing.counts import count_parameters

from conftest import TINY_CONFIGS, full_precision_norms, make_tiny_model, random_batches
from test_streaming import _assert_streams_as_in_memory

POST_NORM_FAMILIES = ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM"]


def _ids(vocab):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_embedding_widths_without_slicing_are_exact(arch):
    model = make_tiny_model(arch, tied=True, dtype=torch.float64)
    full_precision_norms(model)
    ids = _ids(model.config.vocab_size)
    reference = model(ids).logits
    slice_model(model, None, SliceConfig(sparsity=0.0, widths="embedding"), random_batches(model.config.vocab_size),
                progress=False)
    assert (model(ids).logits - reference).abs().max().item() <= 1e-9


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM", "PhiForCausalLM",
                                  "MixtralForCausalLM"])
@pytest.mark.parametrize("tied", [True, False])
def test_only_the_embeddings_narrow_and_the_size_is_predicted(arch, tied):
    model = make_tiny_model(arch, tied=tied)
    family = family_for(model)
    config = SliceConfig(sparsity=0.25, widths="embedding")
    dense_layers = {name: p.shape for name, p in model.named_parameters() if ".layers." in name or ".h." in name}
    predicted = predicted_parameters(model, family, config, uniform_widths(model, family, 48, config))
    slice_model(model, None, config, random_batches(model.config.vocab_size), progress=False)
    assert count_parameters(model) == predicted
    slicing = model.config.slicing
    assert slicing["embedding_width"] == 48 and model.get_input_embeddings().weight.shape[1] == 48
    assert slicing["head_in"] == model.config.hidden_size
    layers = slicing["layers"]
    assert all(record["in"] == record["out"] == model.config.hidden_size for record in layers[1:])
    # One map, the first layer's attention shortcut, brings the embeddings into the stream.
    first = layers[0].get("no_shortcut", [])
    assert "attn" not in first and all(set(r["no_shortcut"]) >= {"attn"} for r in layers[1:])
    # Past the first layer (whose branch inputs read the embedding basis), every layer weight
    # keeps its dense shape.
    for name, param in model.named_parameters():
        if name in dense_layers and ".layers.0." not in name:
            assert param.shape == dense_layers[name], name


@pytest.mark.parametrize("arch", POST_NORM_FAMILIES)
def test_post_norms_keep_a_scale_vector(arch):
    model = make_tiny_model(arch, tied=True)
    slice_model(model, None, SliceConfig(sparsity=0.25, widths="embedding"), random_batches(96), progress=False)
    family = family_for(make_tiny_model(arch, tied=True))
    for layer in model.get_submodule(family.layers):
        for path in (family.attn_post_norm, family.mlp_post_norm):
            assert type(layer.get_submodule(path)).__name__ == "NormThenScale"
            assert layer.get_submodule(path).weight.shape == (model.config.hidden_size,)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM"])
def test_round_trip_and_remote_code(tmp_path, arch):
    model = make_tiny_model(arch, tied=True)
    slice_model(model, None, SliceConfig(sparsity=0.25, widths="embedding"), random_batches(96), progress=False)
    save_sliced(model, None, tmp_path / "out")
    ids = _ids(96)
    expected = model(ids).logits
    assert torch.allclose(load_sliced(tmp_path / "out")(ids).logits, expected, atol=1e-6)
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.allclose(remote(ids).logits, expected, atol=1e-6)


@pytest.mark.parametrize("arch,tied", [("LlamaForCausalLM", True), ("Gemma3ForCausalLM", True),
                                       ("Qwen2ForCausalLM", False)])
def test_streamed_embedding_widths_equal_in_memory(tmp_path, arch, tied):
    _assert_streams_as_in_memory(tmp_path, arch, tied, {"widths": "embedding"})


def test_a_budget_sets_the_embedding_width():
    model = make_tiny_model("Gemma3ForCausalLM", tied=False)
    dense = count_parameters(model)
    config = SliceConfig(target_params=dense - 1500, widths="embedding", round_to=8)
    slice_model(model, None, config, random_batches(96), progress=False)
    assert count_parameters(model) <= dense - 1500
    wider = uniform_widths(model, family_for(make_tiny_model("Gemma3ForCausalLM")),
                           model.config.slicing["embedding_width"] + 8, config)
    assert predicted_parameters(make_tiny_model("Gemma3ForCausalLM"), family_for(make_tiny_model("Gemma3ForCausalLM")),
                                config, wider) > dense - 1500


@pytest.mark.parametrize("settings,message", [({"rotations": "model"}, "rotations must be auto or block"),
                                              ({"refit": True}, "nothing to refit")])
def test_embedding_widths_refuse_what_they_cannot_do(settings, message):
    with pytest.raises(SliceGPTError, match=message):
        SliceConfig(sparsity=0.25, widths="embedding", **settings)


def test_cli_run_reports_and_loads(tiny_model_dir, tmp_path, capsys):
    import json

    from slicegpt.cli import main
    from conftest import tiny_slice_args

    out = tmp_path / "out"
    assert main(tiny_slice_args(tiny_model_dir, out) + ["--widths", "embedding"]) == 0
    report = json.loads((out / "slicing_report.json").read_text())
    assert report["config"]["widths"] == "embedding" and report["config"]["rotations"] == "block"
    card = (out / "README.md").read_text()
    assert "Only the embeddings were sliced" in card
    assert load_sliced(out).config.slicing["embedding_width"] == 48


@pytest.fixture(scope="module")
def big_vocab_gemma_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny Gemma 3 with SmolLM2's 49,152-token vocabulary: the embedding dominates it."""
    config = TINY_CONFIGS["Gemma3ForCausalLM"](True)
    config.vocab_size = len(smollm2_tokenizer)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma-big-vocab")
    transformers.Gemma3ForCausalLM(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_cli_auto_slices_only_the_embeddings_and_refuses_plain(big_vocab_gemma_dir, tmp_path, capsys):
    from slicegpt.cli import main
    from conftest import WIKITEXT_VALIDATION

    args = ["slice", str(big_vocab_gemma_dir), "--sparsity", "0.25", "--cal-data", str(WIKITEXT_VALIDATION),
            "--cal-samples", "2", "--cal-seqlen", "32"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert "only the embeddings sliced" in capsys.readouterr().err
    assert load_sliced(tmp_path / "out").config.slicing["config"]["widths"] == "embedding"
    assert main([*args, "--out", str(tmp_path / "plain"), "--plain"]) == 2
    assert "here only the embeddings are sliced" in capsys.readouterr().err
