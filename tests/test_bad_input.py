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
