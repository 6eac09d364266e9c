"""The jobs run from Python, without the command line: a config in, a result out."""

import json

import pytest
import torch
import transformers

import slicegpt

from conftest import WIKITEXT_VALIDATION, random_batches

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def one_basis_slice(tiny_model_dir, smollm2_tokenizer, tmp_path_factory):
    """The tiny model sliced with one basis through the Python API, saved with a report that names it."""
    model, _ = slicegpt.load_model(str(tiny_model_dir))
    config = slicegpt.SliceConfig(sparsity=0.25, rotations="model")
    slicegpt.slice_model(model, None, config, random_batches(len(smollm2_tokenizer), seqlen=32), progress=False)
    out = tmp_path_factory.mktemp("one-basis") / "sliced"
    slicegpt.save_sliced(model, smollm2_tokenizer, out, report={"config": {"model": str(tiny_model_dir)}})
    return out


def test_recover_fine_tunes_and_writes_a_checkpoint(one_basis_slice, tmp_path):
    training = slicegpt.FinetuneConfig(steps=2, seqlen=32, batch_size=2, lr=1e-3, data=str(WIKITEXT_VALIDATION))
    run = slicegpt.recover(slicegpt.RecoverConfig(str(one_basis_slice), str(tmp_path / "tuned"), training))
    assert isinstance(run, slicegpt.RecoverResult) and run.source == one_basis_slice and run.out == tmp_path / "tuned"
    assert json.loads((run.out / "slicing_report.json").read_text()) == run.report
    assert run.report["finetune"]["config"]["steps"] == 2 and run.report["finetune"]["config"]["teacher"] is None
    assert len(json.loads((run.out / "loss_curve.json").read_text())["loss"]) == 2
    before, after = slicegpt.load_sliced(one_basis_slice), slicegpt.load_sliced(run.out)
    ids = torch.arange(1, 25).view(2, 12)
    assert (after(ids).logits - before(ids).logits).abs().max() > 1e-4


def test_export_writes_a_plain_model_and_says_what_untying_cost(one_basis_slice, tmp_path):
    notes = []
    out = tmp_path / "plain"
    result = slicegpt.export(slicegpt.ExportConfig(str(one_basis_slice), str(out), "plain"), warn=notes.append)
    assert result == {"out": str(out), "format": "plain", "untied_head_note": notes[0]}
    assert "The tied head is untied" in notes[0]
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.hidden_size == 48


def test_a_config_the_job_cannot_run_is_refused(one_basis_slice, tmp_path):
    with pytest.raises(slicegpt.SliceGPTError, match="--quantize needs --format gguf"):
        slicegpt.export(slicegpt.ExportConfig(str(one_basis_slice), str(tmp_path / "p"), "plain", quantize="Q4_0"))
    with pytest.raises(slicegpt.SliceGPTError, match="not a sliced checkpoint directory"):
        slicegpt.recover(slicegpt.RecoverConfig(str(tmp_path), str(tmp_path / "tuned")))
