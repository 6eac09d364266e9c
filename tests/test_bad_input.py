"""Damaged input ends in one `slicegpt: error:` line (exit status 2), and outputs get ordinary permissions."""

import errno
import os
import re
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
    # More than the machine can start or hold: refused with the bound, not a traceback mid-run.
    ("ppl", ["--threads", "100000"], "--threads 100000 is more than this machine runs usefully: at most"),
    ("bench", ["--threads", "100000"], "--threads 100000 is more than this machine runs usefully"),
    ("bench", ["--batch-sizes", "1,1000000000"], "--batch-sizes 1000000000: 1000000000 sequences of 10 tokens"),
    # Every sparsity of a sweep is checked before the first is sliced.
    ("sweep", ["--sparsities", "0.25,0.999"], "--sparsities 0.999: sparsity 0.999 with round-to 8 leaves no width"),
    ("sweep", ["--sparsities", "0.101,0.104"], "would both be saved as sparsity-0.10"),
    ("slice", ["--seed", str(2**63)], "--seed must be a 64-bit integer (from -2**63 to 2**63 - 1)"),
    ("export-gguf", ["--rotate", "random", "--rotate-seed", str(2**63)],
     "--rotate-seed must be a 64-bit integer (from -2**63 to 2**63 - 1)"),
])
def test_bad_option_value(tiny_model_dir, tmp_path, capsys, name, bad, message):
    refused(capsys, command(name, tiny_model_dir, tmp_path / "out") + bad, message, out=tmp_path / "out")


@pytest.mark.parametrize("content,quantize,message", [
    (b"PK\x03\x04 a zip file", ["--quantize", "Q4_0"], "is not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00", [], "--imatrix weighs llama.cpp's quantization: it needs --quantize TYPE"),
])
def test_imatrix_that_cannot_weigh_a_quantization(tiny_model_dir, tmp_path, capsys, content, quantize, message):
    given = tmp_path / "given.imatrix.gguf"
    given.write_bytes(content)
    refused(capsys, command("export-gguf", tiny_model_dir, tmp_path / "out") + ["--imatrix", str(given), *quantize],
            message, out=tmp_path / "out.gguf")


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


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself), with its bytes."""
    return {str(p): p.read_bytes() for p in ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file()}


@pytest.mark.parametrize("name,out,message", [
    # The model itself, a folder that holds it, a file inside it: for every command that writes.
    ("eval", "{model}", "would replace the model the run reads"),
    ("eval", "{root}", "which it holds"),
    ("sweep", "{model}/sweep", "lies inside the model the run reads"),
    ("slice-streaming", "{root}", "which it holds"),
    ("export-gguf", "{model}/model", "lies inside the model the run reads"),
    ("bench", "{model}/config", "lies inside the model the run reads"),
    ("finetune", "{model}/finetuned", "lies inside the model the run reads"),
    ("eval", "{link}", "would replace the model the run reads"),  # another spelling of the model's folder
    # The data the run reads.
    ("slice", "{data}", "would replace the --cal-data text the run reads"),
    ("sweep", "{data}", "would replace the --cal-data text the run reads"),
    # slicegpt's cache: a named model's or a GGUF file's converted copy, the cache itself, a folder holding it.
    ("slice", "{cache}/smollm2-135m", "lies in slicegpt's cache"),
    ("eval", "{cache}/gguf/model-0123456789abcdef", "lies in slicegpt's cache"),
    ("bench", "{cache}/results", "lies in slicegpt's cache"),
    ("sweep", "{cache}", "lies in slicegpt's cache"),
    ("finetune", "{home}", "holds slicegpt's cache"),
])
def test_output_that_would_destroy_what_the_run_reads(tiny_model_dir, tmp_path, capsys, monkeypatch, name, out,
                                                      message):
    """Refused with --overwrite too, before any work, and nothing read is touched."""
    import shutil

    home = tmp_path / "home"
    cache = home / ".cache" / "slicegpt"
    (cache / "smollm2-135m").mkdir(parents=True)
    (cache / "smollm2-135m" / "config.json").write_text("{}")
    monkeypatch.setenv("SLICEGPT_CACHE", str(cache))
    root = tmp_path / "models"
    model = shutil.copytree(tiny_model_dir, root / "model")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(WIKITEXT_VALIDATION, data)
    (tmp_path / "link").symlink_to(model)
    fill = dict(model=model, root=root, data=data, cache=cache, home=home, link=tmp_path / "link")
    argv = command(name, model, out.format(**fill)) + ["--overwrite"]
    argv = [str(data / WIKITEXT_VALIDATION.name) if a == str(WIKITEXT_VALIDATION) else a for a in argv]
    before = {**tree(root), **tree(data), **tree(home)}
    refused(capsys, argv, message)
    assert {**tree(root), **tree(data), **tree(home)} == before


def test_named_model_output_in_the_cache_is_refused_before_converting(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLICEGPT_CACHE", str(cache))
    refused(capsys, ["slice", "smollm2-135m", "--sparsity", "0.25", "--out", str(cache / "smollm2-135m"),
                     "--overwrite", *CAL], "lies in slicegpt's cache")
    assert not cache.exists()  # the embedded GGUF was not converted to be replaced


def test_gguf_output_that_would_destroy_the_file_or_its_conversion(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    import torch
    from test_gguf import GGUF_MODELS, _byte_tokens, write_tiny_gguf

    cache = tmp_path / "cache"
    monkeypatch.setenv("SLICEGPT_CACHE", str(cache))
    model_class, make_config = GGUF_MODELS["qwen2"]
    torch.manual_seed(0)
    gguf_file = tmp_path / "models" / "tiny.gguf"
    gguf_file.parent.mkdir()
    write_tiny_gguf(gguf_file, "qwen2", model_class(make_config(len(_byte_tokens()))))
    assert main(["ppl", str(gguf_file), *PPL]) == 0  # converts it into the cache
    converted = next((cache / "gguf").glob("tiny-*"))
    before = {**tree(gguf_file), **tree(converted)}
    for out, message in ((gguf_file.parent, "would replace the model the run reads"),
                         (converted, "lies in slicegpt's cache")):
        refused(capsys, ["slice", str(gguf_file), "--sparsity", "0.25", "--out", str(out), "--overwrite", *CAL],
                message)
    assert {**tree(gguf_file), **tree(converted)} == before


def test_gguf_files_of_one_name_and_size_are_two_models(tmp_path, monkeypatch):
    """The converted copy is found by the file's bytes, not its name and size: in another folder,
    or replaced in place, another model loads as itself."""
    pytest.importorskip("gguf")
    import torch
    from test_gguf import GGUF_MODELS, _byte_tokens, write_tiny_gguf

    from slicegpt.io.models import load_model

    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    model_class, make_config = GGUF_MODELS["qwen2"]
    dense = {}
    for seed, folder in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        dense[folder] = model_class(make_config(len(_byte_tokens()))).eval()
        (tmp_path / folder).mkdir()
        write_tiny_gguf(tmp_path / folder / "model.gguf", "qwen2", dense[folder])
    assert (tmp_path / "a" / "model.gguf").stat().st_size == (tmp_path / "b" / "model.gguf").stat().st_size
    ids = torch.arange(20).unsqueeze(0)

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    for folder in ("a", "b"):
        loaded, _ = load_model(str(tmp_path / folder / "model.gguf"))
        assert torch.allclose(logits(loaded), logits(dense[folder]), rtol=0, atol=1e-5), folder
    (tmp_path / "a" / "model.gguf").write_bytes((tmp_path / "b" / "model.gguf").read_bytes())  # same size, in place
    loaded, _ = load_model(str(tmp_path / "a" / "model.gguf"))
    assert torch.allclose(logits(loaded), logits(dense["b"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bench", "eval"])
def test_empty_output_is_refused(tiny_model_dir, tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    argv = command(name, tiny_model_dir, "out")
    argv[argv.index("--out") + 1] = ""
    refused(capsys, argv, "--out is empty")
    assert not list(tmp_path.iterdir())


def test_bench_keeps_an_existing_output_without_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("earlier results\n")
    refused(capsys, ["bench", str(tiny_model_dir), *BENCH, "--out", str(out)], "exists (use --overwrite")
    assert out.read_text() == "earlier results\n"


def test_single_file_outputs_are_replaced_whole_or_not_at_all(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """bench's JSON goes to a temporary file beside it, renamed into place; a failed write leaves
    the old file and no temporary."""
    import json

    import slicegpt.io.checkpoint as checkpoint

    out = tmp_path / "bench.json"
    out.write_text("earlier results\n")
    argv = ["bench", str(tiny_model_dir), *BENCH, "--out", str(out), "--overwrite"]
    with monkeypatch.context() as patch:
        def full_disk(path):
            raise OSError(28, "No space left on device")

        patch.setattr(checkpoint, "ordinary_permissions", full_disk)  # the temporary is written by then
        refused(capsys, argv, f"cannot write {out}: No space left on device (the earlier file is kept)")
    assert out.read_text() == "earlier results\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
    assert main(argv) == 0
    assert isinstance(json.loads(out.read_text()), dict)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


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
    (root / "no-model-type").mkdir()
    (root / "no-model-type" / "config.json").write_text("{}")
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
    ("no-model-type", SLICE, "config.json has no model_type"),
    ("no-model-type", [*SLICE, "--streaming"], "config.json has no model_type"),
    ("no-model-type", ["ppl", "{model}", *PPL], "config.json has no model_type"),
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


@pytest.fixture(scope="module")
def mismatched_dirs(tiny_model_dir, tmp_path_factory):
    """The tiny model's weights under a config.json that gives another width or vocabulary."""
    import json

    root = tmp_path_factory.mktemp("mismatched")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for name, change in {"hidden": {"hidden_size": 48}, "vocab": {"vocab_size": config["vocab_size"] + 10}}.items():
        copy_dir(tiny_model_dir, root / name)
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
    return root


@pytest.mark.parametrize("name", ["slice", "slice-streaming", "ppl"])
@pytest.mark.parametrize("which,message", [
    ("hidden", "config.json gives hidden_size 48, but the weights are 64 wide (model.layers.0.input_layernorm"),
    ("vocab", "config.json gives vocab_size 49162, but the weights hold 49152 tokens (model.embed_tokens.weight"),
])
def test_config_sizes_that_disagree_with_the_weights(mismatched_dirs, tmp_path, capsys, name, which, message):
    """Read from the safetensors headers before loading: loading itself fails with a traceback."""
    refused(capsys, command(name, mismatched_dirs / which, tmp_path / "out"), message, out=tmp_path / "out")


@pytest.mark.parametrize("name", ["slice", "slice-streaming", "sweep", "finetune", "export-plain", "export-gguf",
                                  "eval"])
def test_output_name_too_long_for_the_temporaries_beside_it(tiny_model_dir, tmp_path, capsys, name):
    """249 bytes fit NAME_MAX (255), but `.NAME.partial-XXXXXXXX` does not: refused before the work, not
    when the slice is saved."""
    if os.pathconf(tmp_path, "PC_NAME_MAX") != 255:
        pytest.skip("this filesystem's NAME_MAX is not 255")
    out = tmp_path / ("a" * 249)
    refused(capsys, command(name, tiny_model_dir, out), "bytes, too long for the temporaries the run writes",
            "use a name of at most 237 bytes", out=out)
    assert list(tmp_path.iterdir()) == []


# --- Text rows: each row's text is a string (a blank one too), or the run stops at its file and line. ---

def rows_file(directory: Path, bad: str) -> Path:
    """Good rows (one with a U+2028 inside its string, one blank, an empty line), then `bad` on line 4."""
    path = directory / "rows.jsonl"
    path.write_text('{"text": "one\u2028line"}\n{"text": ""}\n\n' + bad + '\n{"text": "after"}\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("row,message", [('{"text": null}', "'text' is null, not a string"),
                                         ('{"text": ["a", "b"]}', "'text' is a list ([\"a\", \"b\"]), not a string"),
                                         ('{"text": 7}', "'text' is an int (7), not a string")])
def test_text_row_that_is_not_a_string(tmp_path, capsys, tiny_model_dir, row, message):
    data = rows_file(tmp_path, row)
    refused(capsys, ["ppl", str(tiny_model_dir), *PPL, "--data", str(data)], f"{data}:4: {message}")


@pytest.mark.parametrize("name,option", [("slice", ["--cal-data"]), ("slice-streaming", ["--cal-data"]),
                                         ("slice", [*EVAL_PPL, "--ppl-data"]), ("sweep", ["--cal-data"]),
                                         ("sweep", ["--ppl-data"]), ("finetune", ["--data"]),
                                         ("finetune", ["--heldout-data"]), ("finetune", [*EVAL_PPL, "--ppl-data"])])
def test_every_reader_of_text_rows_checks_them(sliced_dirs, tiny_model_dir, tmp_path, capsys, name, option):
    data = rows_file(tmp_path, '{"text": null}')
    model = sliced_dirs / "memory" if name == "finetune" else tiny_model_dir
    out = tmp_path / "out"
    refused(capsys, command(name, model, out) + option + [str(data)], f"{data}:4: 'text' is null", out=out)


def test_hub_rows_that_are_not_strings(monkeypatch):
    import datasets

    from slicegpt.errors import SliceGPTError
    from slicegpt.io.data import load_texts

    rows = datasets.Dataset.from_dict({"text": ["a", "", None]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows)
    with pytest.raises(SliceGPTError, match=r"dataset 'some/corpus' \(split train\), row 3: 'text' is null"):
        load_texts("some/corpus")


# --- The Python API: the rules the CLI checks its flags by, as ValueErrors and TypeErrors. ---

def _perplexity(*args, **kwargs):
    from slicegpt import perplexity

    return perplexity(*args, progress=False, **kwargs)


def _zeroshot(*args, **kwargs):
    from slicegpt.evaluation.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(*args, **kwargs)


@pytest.mark.parametrize("call,kind,message", [
    pytest.param(lambda model: SliceConfig(sparsity="0.25"), TypeError, "sparsity must be a number, got '0.25' (str)",
                 id="SliceConfig-string-sparsity"),
    pytest.param(lambda model: SliceConfig(cal_samples=0), ValueError, "cal-samples must be at least 1, got 0",
                 id="SliceConfig-cal-samples"),
    pytest.param(lambda model: _perplexity(model, None, ["some text"], seqlen=1), ValueError,
                 "seqlen must be at least 2, got 1", id="perplexity-seqlen"),
    pytest.param(lambda model: _perplexity(model, None, ["some text"], chunks=0), ValueError,
                 "chunks must be at least 1, got 0", id="perplexity-chunks"),
    pytest.param(lambda model: _perplexity(model, None, ["a", "", None]), TypeError,
                 "texts[2] is null, not a string", id="perplexity-None-text"),
    pytest.param(lambda model: slice_model(model, None, SliceConfig(), ["a", None], progress=False), TypeError,
                 "texts[1] is null, not a string", id="slice_model-None-text"),
    pytest.param(lambda model: _zeroshot(model, None, "piqa", limit=0), ValueError, "limit must be at least 1, got 0",
                 id="evaluate_zeroshot-limit"),
])
def test_python_api_refuses_what_the_cli_refuses(call, kind, message):
    from slicegpt.errors import SliceGPTError

    with pytest.raises(kind, match=re.escape(message)) as caught:
        call(make_tiny_model("LlamaForCausalLM"))
    assert isinstance(caught.value, SliceGPTError)  # the CLI's own refusal, one line there


# --- A disk that fills in the middle of a write: one line, and nothing half-written left. ---

def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fill_then_fail(tensors, path, *args, **kwargs):
    """A safetensors writer on a disk that fills: a few bytes of `path`, then ENOSPC."""
    Path(path).write_bytes(b"\0" * 64)
    raise _no_space(path)


def _fill_then_fail_in_rust(tensors, path, *args, **kwargs):
    """As safetensors reports it: its own error type, the errno only in the text."""
    from safetensors import SafetensorError

    Path(path).write_bytes(b"\0" * 64)
    raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"')


def _gguf_fill_then_fail(self, *args, **kwargs):
    raise _no_space(self.path)


DISK_FULL_WRITERS = {
    "slice": ("transformers.modeling_utils.safe_save_file", _fill_then_fail),
    "slice-streaming": ("slicegpt.io.shards.save_file", _fill_then_fail_in_rust),
    "finetune": ("transformers.modeling_utils.safe_save_file", _fill_then_fail),
    "export-plain": ("transformers.modeling_utils.safe_save_file", _fill_then_fail),
    "export-gguf": ("gguf.GGUFWriter.write_tensors_to_file", _gguf_fill_then_fail),
}


@pytest.fixture(scope="module")
def shared_basis_dir(tiny_model_dir, smollm2_tokenizer, tmp_path_factory):
    """The tiny model sliced with one basis, which plain and GGUF export take."""
    import transformers

    out = tmp_path_factory.mktemp("shared-basis") / "sliced"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    slice_model(model, smollm2_tokenizer, SliceConfig(sparsity=0.25, rotations="model"),
                random_batches(len(smollm2_tokenizer), count=1), progress=False)
    save_sliced(model, smollm2_tokenizer, out, report={"config": {"model": str(tiny_model_dir)}})
    return out


@pytest.mark.parametrize("name", list(DISK_FULL_WRITERS))
def test_disk_full_while_writing(tiny_model_dir, shared_basis_dir, tmp_path, capsys, monkeypatch, name):
    if name == "export-gguf":
        pytest.importorskip("gguf")
    target, writer = DISK_FULL_WRITERS[name]
    monkeypatch.setattr(target, writer)
    model = tiny_model_dir if name.startswith("slice") else shared_basis_dir
    out = tmp_path / "out"
    code = main(command(name, model, out))
    assert_one_error_line(capsys, code, "no space left on the device while writing ", "run the command again")
    leftovers = [p.name for p in tmp_path.rglob("*")
                 if p.name.endswith((".tmp", ".gguf", ".gguf.partial")) or "partial-" in p.name]
    assert not out.exists() and not Path(f"{out}.gguf").exists() and leftovers == []
