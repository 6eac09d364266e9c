"""Damaged input ends in one `slicegpt: error:` line (exit status 2), and outputs get ordinary permissions."""

import os
import stat
from pathlib import Path

import pytest

from slicegpt import SliceConfig, save_sliced, slice_model
from slicegpt.cli import main
from slicegpt.running.streaming import StreamingRun

from conftest import WIKITEXT_TEST, WIKITEXT_VALIDATION, make_tiny_model, random_batches

PPL = ["--data", str(WIKITEXT_TEST), "--chunks", "1", "--seqlen", "32"]
CAL = ["--cal-data", str(WIKITEXT_VALIDATION), "--cal-samples", "2", "--cal-seqlen", "32"]


def assert_one_error_line(capsys, code, *fragments):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("slicegpt: error: ")]
    assert code == 2 and len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.fixture(scope="module")
def sliced_dirs(tiny_model_dir, smollm2_tokenizer, tmp_path_factory):
    """The tiny model sliced in memory (one weights file) and streamed (one shard per piece)."""
    import transformers

    root = tmp_path_factory.mktemp("sliced")
    config, batches = SliceConfig(sparsity=0.25), random_batches(len(smollm2_tokenizer), count=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    slice_model(model, smollm2_tokenizer, config, batches, progress=False)
    save_sliced(model, smollm2_tokenizer, root / "memory")
    job = StreamingRun(tiny_model_dir, root / "streamed", config, progress=False)
    job.plan(batches)
    job.run(batches)
    job.finish(smollm2_tokenizer)
    return root


def copy_dir(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("which,damaged", [("memory", "model.safetensors"),
                                           ("streamed", "model-00002-of-00004.safetensors")])
def test_truncated_sliced_checkpoint(sliced_dirs, tmp_path, capsys, which, damaged):
    directory = copy_dir(sliced_dirs / which, tmp_path / which)
    truncate(directory / damaged)
    code = main(["ppl", str(directory), *PPL])
    assert_one_error_line(capsys, code, str(directory / damaged), "damaged or truncated")


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming", None])
def test_truncated_dense_checkpoint(tiny_model_dir, tmp_path, capsys, streaming):
    directory = copy_dir(tiny_model_dir, tmp_path / "dense")
    truncate(directory / "model.safetensors")
    code = main(["slice", str(directory), "--sparsity", "0.25", "--out", str(tmp_path / "o"), *CAL,
                 *([streaming] if streaming else [])])
    assert_one_error_line(capsys, code, str(directory / "model.safetensors"), "damaged or truncated")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,message", [
    (b"PK\x03\x04 a zip file, not a model", "is not a GGUF file"),
    (b"", "is not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00", "damaged, truncated"),  # the header stops short
])
def test_bad_gguf_file(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    code = main(["ppl", str(model), *PPL])
    assert_one_error_line(capsys, code, str(model), message)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_truncated_real_gguf(tmp_path, capsys, monkeypatch):
    """A GGUF cut off inside its metadata (the first 100 kB of SmolLM2's)."""
    pytest.importorskip("gguf")
    from slicegpt.errors import SliceGPTError
    from slicegpt.io.models import embedded_gguf

    try:
        source = embedded_gguf("smollm2-135m")
    except SliceGPTError as error:
        pytest.skip(str(error))
    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        model.write_bytes(f.read(100_000))
    code = main(["ppl", str(model), *PPL])
    assert_one_error_line(capsys, code, str(model), "damaged, truncated")


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.rglob("*")]}


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_outputs_follow_the_umask(tmp_path, umask):
    model = make_tiny_model("LlamaForCausalLM")
    model.save_pretrained(tmp_path / "dense", max_shard_size="30KB")
    config, batches = SliceConfig(sparsity=0.25), random_batches(96, count=1)
    job = StreamingRun(tmp_path / "dense", tmp_path / "streamed", config, progress=False)
    job.plan(batches)
    job.run(batches)
    job.finish(None)
    slice_model(model, None, config, batches, progress=False)
    save_sliced(model, None, tmp_path / "memory")
    for out in ("memory", "streamed"):
        found = modes(tmp_path / out)
        assert any(name.endswith(".safetensors") for name in found)
        expected = {name: (0o777 if (tmp_path / out / name).is_dir() else 0o666) & ~umask for name in found}
        assert found == expected, out


# --- Refused before any work: options, devices, output locations, what config.json says. ---

def refused(capsys, argv, *fragments, out=None):
    """The command ends in one error line naming `fragments`, and leaves nothing at `out`."""
    code = main(argv)
    assert_one_error_line(capsys, code, *fragments)
    if out is not None:
        assert not Path(out).exists() and not Path(out).parent.joinpath(f".{Path(out).name}.lock").exists()


FT = ["--data", str(WIKITEXT_VALIDATION), "--steps", "1", "--seqlen", "32"]
BENCH = ["--batch-sizes", "1", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1"]
EVAL_PPL = ["--eval-ppl", "--ppl-data", str(WIKITEXT_TEST), "--ppl-chunks", "1", "--ppl-seqlen", "32"]


def command(name, model, out):
    """A valid command line of each kind; a test appends the bad option (argparse keeps the last)."""
    return {
        "slice": ["slice", str(model), "--sparsity", "0.25", "--out", str(out), *CAL],
        "slice-streaming": ["slice", str(model), "--sparsity", "0.25", "--out", str(out), *CAL, "--streaming"],
        "sweep": ["sweep", str(model), "--sparsities", "0.25", "--out", str(out), *CAL,
                  "--ppl-data", str(WIKITEXT_TEST), "--ppl-chunks", "1", "--ppl-seqlen", "32"],
        "ppl": ["ppl", str(model), *PPL],
        "eval": ["eval", "zeroshot", str(model), "--tasks", "piqa", "--limit", "1", "--out", str(out)],
        "finetune": ["finetune", str(model), *FT, "--out", str(out)],
        "export-plain": ["export", str(model), "--format", "plain", "--out", str(out)],
        "export-gguf": ["export", str(model), "--format", "gguf", "--out", f"{out}.gguf"],
        "bench": ["bench", str(model), *BENCH, "--out", f"{out}.json"],
    }[name]


@pytest.mark.parametrize("name,bad,message", [
    ("slice", ["--threads", "0"], "--threads must be at least 1, got 0"),
    ("ppl", ["--threads", "-2"], "--threads must be at least 1, got -2"),
    ("bench", ["--threads", "0"], "--threads must be at least 1"),
    ("export-gguf", ["--threads", "0"], "--threads must be at least 1"),
    ("ppl", ["--chunks", "-1"], "--chunks must be at least 1, got -1"),
    ("ppl", ["--chunks", "0"], "--chunks must be at least 1, got 0"),
    ("ppl", ["--seqlen", "0"], "--seqlen must be at least 2, got 0"),
    ("ppl", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("slice", [*EVAL_PPL, "--ppl-chunks", "-1"], "--ppl-chunks must be at least 1, got -1"),
    ("slice", [*EVAL_PPL, "--ppl-seqlen", "1"], "--ppl-seqlen must be at least 2, got 1"),
    ("slice", [*EVAL_PPL, "--ppl-batch-size", "0"], "--ppl-batch-size must be at least 1, got 0"),
    ("sweep", ["--ppl-chunks", "0"], "--ppl-chunks must be at least 1, got 0"),
    ("sweep", ["--sparsities", "0.1,1.5"], "--sparsities: each must be in [0, 1), got 1.5"),
    ("slice", ["--round-to", "0"], "--round-to must be at least 1, got 0"),
    ("slice", ["--dist-timeout", "0"], "--dist-timeout must be a positive number, got 0"),
    ("slice", ["--eval-zeroshot", "piqa", "--zeroshot-batch-size", "0"], "--zeroshot-batch-size must be at least 1"),
    ("eval", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("finetune", ["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1), got 1.5"),
    ("finetune", ["--heldout-fraction", "0.1", "--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    ("finetune", ["--lr", "-1"], "--lr must be a positive number, got -1"),
    ("finetune", ["--seqlen", "1"], "--seqlen must be at least 2, got 1"),
    ("finetune", [*EVAL_PPL, "--ppl-seqlen", "0"], "--ppl-seqlen must be at least 2, got 0"),
    ("finetune", ["--seed", str(2**63)], "--seed must be a 64-bit integer (from -2**63 to 2**63 - 1)"),
    ("finetune", ["--heldout-data", str(WIKITEXT_TEST), "--eval-every", "0"],
     "--eval-every must be at least 1, got 0, to measure the held-out text that --heldout-data asks for"),
    ("finetune", ["--data", "teacher", "--teacher-tokens", "0"], "--teacher-tokens must be at least 1, got 0"),
    ("finetune", ["--data", "teacher", "--teacher-temperature", "inf"],
     "--teacher-temperature must be a positive number, got inf"),
    ("finetune", ["--teacher-tokens", "1000"], "--teacher-tokens sets the text the teacher writes, which only "
                                              "--data teacher uses"),
    ("finetune", ["--teacher-temperature", "0.7"], "--teacher-temperature sets the text the teacher writes"),
    ("finetune", ["--teacher-top-p", "0.9"], "--teacher-top-p sets the text the teacher writes"),
    ("finetune", ["--teacher-prompts", "bos"], "--teacher-prompts sets the text the teacher writes"),
    ("finetune", ["--teacher-text", "t.jsonl"], "--teacher-text sets the text the teacher writes"),
    ("finetune", ["--teacher", "smollm2-135m"], "--teacher names the teacher for --distill or --data teacher"),
    ("finetune", ["--data", "teacher", "--teacher-text", "/proc/teacher.jsonl"],
     "--teacher-text /proc/teacher.jsonl: cannot write in /proc"),
    ("bench", ["--warmup", "-1"], "--warmup must be at least 0, got -1"),
])
def test_bad_option_value(tiny_model_dir, tmp_path, capsys, name, bad, message):
    refused(capsys, command(name, tiny_model_dir, tmp_path / "out") + bad, message, out=tmp_path / "out")


@pytest.mark.parametrize("content,message", [
    ("my notes\n", "exists without its settings file notes.json, so it is not a teacher-text file"),
    (None, "is a directory; give a file name"),
])
def test_teacher_text_that_is_not_ours(tiny_model_dir, tmp_path, capsys, content, message):
    """--teacher-text naming a file of the user's own (or a directory): refused before any model loads."""
    notes = tmp_path / "notes.jsonl"
    if content is None:
        notes.mkdir()
    else:
        notes.write_text(content)
    argv = command("finetune", tiny_model_dir, tmp_path / "out") + ["--data", "teacher", "--teacher-text", str(notes)]
    refused(capsys, argv, str(notes), message, out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.jsonl"]


@pytest.mark.parametrize("name", ["slice", "ppl", "eval", "finetune", "bench"])
@pytest.mark.parametrize("device,message", [("foo", "--device foo is not a device"),
                                            ("cuda", "--device cuda: "), ("cuda:7", "--device cuda:7: ")])
def test_unusable_device(tiny_model_dir, tmp_path, capsys, name, device, message):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > (7 if device == "cuda:7" else 0):
        pytest.skip("this machine has the GPU asked for")
    refused(capsys, command(name, tiny_model_dir, tmp_path / "out") + ["--device", device], message,
            out=tmp_path / "out")


@pytest.mark.parametrize("name", ["slice", "slice-streaming", "sweep", "eval", "finetune", "export-plain",
                                  "export-gguf", "bench"])
@pytest.mark.parametrize("where", ["under a file", "/proc", "/dev/null"])
def test_output_where_nothing_can_be_written(tiny_model_dir, tmp_path, capsys, name, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    parent = {"under a file": blocker, "/proc": Path("/proc"), "/dev/null": Path("/dev/null")}[where]
    if not parent.exists():
        pytest.skip(f"no {parent} here")
    message = "cannot write in /proc" if where == "/proc" else f"{parent} is not a directory"
    refused(capsys, command(name, tiny_model_dir, parent / "out"), "--out", message)
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("name", ["slice", "finetune", "export-plain"])
def test_output_that_would_replace_the_input(tiny_model_dir, tmp_path, capsys, name):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    for out in (model, tmp_path):  # the model itself, or a directory that holds it
        refused(capsys, command(name, model, out) + ["--overwrite"], "would replace the model the run reads")
    refused(capsys, command(name, model, ""), "--out is empty")
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory, tiny_model_dir):
    """Model directories that only a config.json describes: nothing here may load weights."""
    import json

    import transformers

    root = tmp_path_factory.mktemp("configs")
    (root / "gpt2").mkdir()
    make_tiny_model("GPT2LMHeadModel").config.save_pretrained(root / "gpt2")  # 64 learned positions
    (root / "bloom").mkdir()
    transformers.BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4).save_pretrained(root / "bloom")
    (root / "not-json").mkdir()
    (root / "not-json" / "config.json").write_text("{ not json")
    (root / "unknown-type").mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (root / "unknown-type" / "config.json").write_text(json.dumps({**config, "model_type": "no-such-type"}))
    # A slice of a 3-head model, 32 wide: a plain Llama needs a multiple of 3.
    (root / "sliced-3-heads").mkdir()
    dense = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=3, num_key_value_heads=3, head_dim=16)
    sliced = {**dense.to_dict(), "architectures": ["LlamaForCausalLM"], "slicing": {
        "base_architecture": "LlamaForCausalLM", "dense_hidden_size": 48, "embedding_width": 32, "head_in": 32,
        "config": {"round_to": 8}}}
    (root / "sliced-3-heads" / "config.json").write_text(json.dumps(sliced))
    return root


@pytest.mark.parametrize("argv,message", [
    (["slice", "{gpt2}", "--sparsity", "0.25", "--out", "{out}", *CAL, "--cal-seqlen", "65"],
     "--cal-seqlen is 65 tokens, but {gpt2} has learned positions for 64 (n_positions"),
    (["slice", "{gpt2}", "--sparsity", "0.25", "--out", "{out}", *CAL, *EVAL_PPL, "--ppl-seqlen", "128"],
     "--ppl-seqlen is 128 tokens"),
    (["ppl", "{gpt2}", *PPL, "--seqlen", "100"], "--seqlen is 100 tokens, but {gpt2} has learned positions for 64"),
    (["bench", "{gpt2}", *BENCH, "--prompt-len", "60", "--new-tokens", "8"],
     "--prompt-len plus --new-tokens is 68 tokens"),
])
def test_sequence_longer_than_learned_positions(config_dirs, tmp_path, capsys, argv, message):
    fill = {"gpt2": config_dirs / "gpt2", "out": tmp_path / "out"}
    refused(capsys, [a.format(**fill) for a in argv], message.format(**fill), out=tmp_path / "out")


SLICE = ["slice", "{model}", "--sparsity", "0.25", "--out", "{out}", *CAL]
EXPORT = ["export", "{model}", "--format", "plain", "--out", "{out}"]


@pytest.mark.parametrize("model,argv,message", [
    ("not-json", SLICE, "config.json is not valid JSON"),
    ("not-json", [*SLICE, "--streaming"], "config.json is not valid JSON"),
    ("not-json", ["ppl", "{model}", *PPL], "config.json is not valid JSON"),
    ("not-json", EXPORT, "config.json is not valid JSON"),
    ("unknown-type", SLICE, "model type 'no-such-type' in config.json is unknown to transformers"),
    ("unknown-type", SLICE, "; slicegpt slices CohereForCausalLM, "),  # its own list, not transformers' every config
    ("unknown-type", ["ppl", "{model}", *PPL], "model type 'no-such-type' in config.json is unknown"),
    ("bloom", SLICE, "architecture BloomForCausalLM is not supported; supported: "),
    ("sliced-3-heads", SLICE, "is a sliced checkpoint already"),
    ("sliced-3-heads", EXPORT, "a plain LlamaForCausalLM cannot be 32 wide"),
])
def test_what_config_json_says_is_checked_before_loading(config_dirs, tmp_path, capsys, model, argv, message):
    """Each of these directories has no weights: a refusal made after loading would fail otherwise."""
    out = tmp_path / "out"
    refused(capsys, [a.format(model=config_dirs / model, out=out) for a in argv], message, out=out)


def test_plain_export_names_the_widths_that_work(config_dirs, tmp_path, capsys):
    refused(capsys, ["export", str(config_dirs / "sliced-3-heads"), "--format", "plain", "--out", str(tmp_path / "o")],
            "widths that work near it are 24 or 48", "--round-to 24", out=tmp_path / "o")


@pytest.fixture(scope="module")
def three_head_dir(tmp_path_factory, smollm2_tokenizer):
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("three-heads")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_slice_plain_picks_widths_the_plain_class_accepts(three_head_dir, tmp_path, capsys):
    """25% of 48 is 36, rounded to 32 by --round-to 8: not a multiple of the 3 heads."""
    import json

    out = tmp_path / "plain"
    assert main(["slice", str(three_head_dir), "--sparsity", "0.25", "--rotations", "model", "--plain",
                 "--out", str(out), *CAL]) == 0
    assert "--plain: widths rounded to a multiple of 24 instead of 8" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 24 and "slicing" not in config


def test_rotary_model_past_its_context_is_noted(tiny_model_dir, tmp_path, capsys):
    """A rotary model runs past max_position_embeddings; the run says so rather than refusing."""
    import json
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "short-context")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    assert main(["ppl", str(model), *PPL]) == 0
    assert "note: --seqlen is 32 tokens, longer than the 16 positions" in capsys.readouterr().err
