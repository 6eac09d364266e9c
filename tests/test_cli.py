"""The command line end to end on a tiny model, and every bad input it must refuse cleanly."""

import json

import pytest
import torch
import transformers

from slicegpt.cli import main
from slicegpt.io.checkpoint import REPORT_FILE

from conftest import WIKITEXT_TEST, WIKITEXT_VALIDATION

CAL = ["--cal-data", str(WIKITEXT_VALIDATION), "--cal-samples", "4", "--cal-seqlen", "64", "--cal-batch-size", "2"]


def slice_args(model, out, *extra):
    return ["slice", str(model), "--sparsity", "0.25", "--out", str(out), *CAL, *extra]


def assert_clean_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_slice_then_ppl(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sliced"
    code = main(slice_args(tiny_model_dir, out, "--eval-ppl", "--ppl-data", str(WIKITEXT_TEST), "--ppl-chunks", "1",
                           "--ppl-seqlen", "128"))
    assert code == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert set(report) >= {"config", "widths", "params", "ppl", "timings_s", "versions"}
    assert report["config"]["sparsity"] == 0.25 and report["config"]["cal_samples"] == 4
    assert report["widths"]["layers"][0] == {"in": 48, "mid": 48, "out": 48}
    params = report["params"]
    assert set(params) == {"dense", "sliced", "shortcuts", "head"}
    assert params["shortcuts"] == 2 * 2 * 48 * 48
    assert report["ppl"]["dense"] > 1 and report["ppl"]["sliced"] > 1
    assert report["timings_s"]["calibrate_and_slice"] > 0
    assert "torch" in report["versions"] and "transformers" in report["versions"]
    config = json.loads((out / "config.json").read_text())
    assert config["slicing"]["layers"] == report["widths"]["layers"]
    capsys.readouterr()

    assert main(["ppl", str(out), "--data", str(WIKITEXT_TEST), "--chunks", "1", "--seqlen", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ppl"] == pytest.approx(report["ppl"]["sliced"], rel=1e-4)
    assert result["params"] == params["sliced"] and result["tokens"] == 127


def test_sparsity_zero_keeps_the_function(tiny_model_dir, tmp_path):
    out = tmp_path / "rotated"
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0", "--out", str(out), *CAL]) == 0
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rotated = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(0, dense.config.vocab_size, (1, 16))
    assert (dense(ids).logits - rotated(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("sparsity", ["-0.1", "1.0", "1.5"])
def test_sparsity_out_of_range(tiny_model_dir, tmp_path, capsys, sparsity):
    code = main(["slice", str(tiny_model_dir), "--sparsity", sparsity, "--out", str(tmp_path / "o"), *CAL])
    assert_clean_error(capsys, code, "sparsity must be in [0, 1)")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, smollm2_tokenizer, capsys):
    config = transformers.BloomConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, n_layer=1, n_head=2)
    path = tmp_path / "bloom"
    transformers.BloomForCausalLM(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    code = main(slice_args(path, tmp_path / "o"))
    assert_clean_error(capsys, code, "BloomForCausalLM is not supported", "LlamaForCausalLM")
    assert not (tmp_path / "o").exists()


def test_calibration_data_too_short(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "only a few words here"}) + "\n")
    code = main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / "o"),
                 "--cal-data", str(short), "--cal-samples", "4", "--cal-seqlen", "64"])
    assert_clean_error(capsys, code, "calibration data too short")


def test_missing_files(tmp_path, tiny_model_dir, capsys):
    code = main(slice_args(tmp_path / "no-such-model", tmp_path / "o"))
    assert_clean_error(capsys, code, "no-such-model")
    code = main(["slice", str(tiny_model_dir), "--sparsity", "0.2", "--out", str(tmp_path / "o"),
                 "--cal-data", str(tmp_path / "missing.jsonl")])
    assert_clean_error(capsys, code, "missing.jsonl")
    code = main(["ppl", str(tiny_model_dir), "--data", str(tmp_path / "nothere.txt")])
    assert_clean_error(capsys, code, "nothere.txt")


def test_unreadable_files(tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    code = main(slice_args(tiny_model_dir, tmp_path / "o")[:-8] + ["--cal-data", str(broken)])
    assert_clean_error(capsys, code, "broken.jsonl:1 is not valid JSON")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 10)
    code = main(["ppl", str(tiny_model_dir), "--data", str(binary)])
    assert_clean_error(capsys, code, "cannot read data file")
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    code = main(slice_args(not_a_model, tmp_path / "o"))
    assert_clean_error(capsys, code, "not a model directory")


def test_refuses_non_empty_output(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(slice_args(tiny_model_dir, out))
    assert_clean_error(capsys, code, "exists and is not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(slice_args(tiny_model_dir, out, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_non_finite_activations(tmp_path, smollm2_tokenizer, capsys):
    config = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = float("nan")
    path = tmp_path / "nan-model"
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    code = main(slice_args(path, tmp_path / "o"))
    assert_clean_error(capsys, code, "non-finite")
    assert not (tmp_path / "o").exists()


def test_failed_save_leaves_no_output(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from slicegpt.io import checkpoint

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "modeling_source", explode)
    with pytest.raises(OSError):
        main(slice_args(tiny_model_dir, tmp_path / "o"))
    assert list(tmp_path.iterdir()) == []


def test_plain_export_from_the_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(slice_args(tiny_model_dir, out, "--rotations", "model", "--plain")) == 0
    assert not (out / "modeling_sliced.py").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 48
    code = main(slice_args(tiny_model_dir, tmp_path / "o2", "--plain", "--rotations", "block"))
    assert_clean_error(capsys, code, "--plain needs one basis for the whole model")
    # auto picks per-block bases for a deep cut, and --plain says so before any work
    aggressive = slice_args(tiny_model_dir, tmp_path / "o3", "--plain")
    aggressive[aggressive.index("--sparsity") + 1] = "0.5"
    assert_clean_error(capsys, main(aggressive), "auto picks a basis per block")


def test_paper_preset_is_the_papers_method(tiny_model_dir, tmp_path):
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / "o"), *CAL, "--paper"]) == 0
    config = json.loads((tmp_path / "o" / REPORT_FILE).read_text())["config"]
    assert (config["rotations"], config["pca"], config["widths"], config["refit"], config["tied_head"]) == \
        ("block", "raw", "uniform", False, False)


@pytest.mark.parametrize("flag", [["--rotations", "model"], ["--refit"], ["--pca", "normalized"]])
def test_paper_preset_refuses_other_method_options(tiny_model_dir, tmp_path, capsys, flag):
    code = main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(tmp_path / "o"), *CAL, "--paper",
                 *flag])
    err = capsys.readouterr().err
    assert code == 2 and "--paper uses" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,reason", [(["--no-refit"], "--no-refit turns it off"),
                                          ([], "calibration tokens of the")])
def test_the_cli_says_why_auto_keeps_a_basis_per_block(tiny_model_dir, tmp_path, capsys, extra, reason):
    out = tmp_path / "o"
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0.5", "--out", str(out), *CAL, *extra]) == 0
    said = capsys.readouterr()
    assert "rotations auto: a basis per block" in said.out + said.err and reason in said.out + said.err
