"""Zero-shot evaluation through lm-evaluation-harness, offline, on the local task data."""

import json
from pathlib import Path

import pytest
import torch

from slicegpt.cli import main
from slicegpt.errors import SliceGPTError

from conftest import SHARED_DATA, SIX_TASKS, ZEROSHOT_LIMIT, random_batches

lm_eval = pytest.importorskip("lm_eval")

from slicegpt.evaluation import zeroshot  # noqa: E402

pytestmark = pytest.mark.eval
ACC_NORM_TASKS = {"piqa", "arc_easy", "arc_challenge", "hellaswag"}


def test_slice_evaluates_dense_and_sliced_on_all_six_tasks(tiny_sliced_dir):
    report = json.loads((tiny_sliced_dir / "slicing_report.json").read_text())
    assert set(report["zeroshot"]) == {"dense", "sliced"}
    for result in report["zeroshot"].values():
        assert list(result["tasks"]) == SIX_TASKS.split(",")
        for task, metrics in result["tasks"].items():
            assert metrics["samples"] == ZEROSHOT_LIMIT
            assert 0.0 <= metrics["acc"] <= 1.0 and "acc_stderr" in metrics
            assert ("acc_norm" in metrics) == (task in ACC_NORM_TASKS)
            assert Path(metrics["data"]).is_relative_to(SHARED_DATA.resolve())
        paper = [m["acc_norm"] if t in ACC_NORM_TASKS else m["acc"] for t, m in result["tasks"].items()]
        assert result["average"] == pytest.approx(sum(paper) / 6)
    assert "perplexity" in report["zeroshot"]["dense"]["tasks"]["lambada_openai"]
    assert report["config"]["eval_zeroshot"] == SIX_TASKS.split(",")


def test_eval_zeroshot_cli_writes_json_and_plot(tiny_sliced_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "zeroshot", str(tiny_sliced_dir), "--tasks", "piqa,lambada_openai", "--limit", "3",
                 "--batch-size", "2", "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "zeroshot.json").read_text())
    assert printed == written
    assert list(written["tasks"]) == ["piqa", "lambada_openai"]  # lm-eval prints while bootstrapping LAMBADA
    assert written["tasks"]["piqa"]["samples"] == 3
    assert (out / "zeroshot.png").read_bytes().startswith(b"\x89PNG")


def test_in_memory_model_is_left_as_it_was(tiny_model_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(ids).logits
    pad_before = smollm2_tokenizer.pad_token
    result = zeroshot.evaluate_zeroshot(model, smollm2_tokenizer, "arc_easy", limit=2, batch_size=2)
    assert result["tasks"]["arc_easy"]["samples"] == 2
    assert not model.training
    assert torch.equal(model(ids).logits, before)
    assert smollm2_tokenizer.pad_token == pad_before


def test_local_tasks_reuse_lm_evals_own_definitions(tmp_path):
    """As lm-eval loads them, our tasks differ from its own only in the data source and absent splits."""
    from lm_eval.tasks._yaml_loader import load_yaml

    swapped = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split"}
    tasks = zeroshot.available_tasks()
    assert tasks == sorted(SIX_TASKS.split(","))
    specs, _ = zeroshot.write_task_files(tasks, SHARED_DATA, tmp_path)
    for task, spec in zip(tasks, specs):
        ours = load_yaml(spec, resolve_func=False)
        upstream_path = Path(zeroshot.local_task_config(task, SHARED_DATA)["include"])
        assert upstream_path.is_relative_to(zeroshot.lm_eval_tasks_dir())
        upstream = load_yaml(upstream_path, resolve_func=False)
        assert ours["task"] == upstream["task"] == task
        for key in set(ours) | set(upstream):
            if key not in swapped:
                assert ours.get(key) == upstream.get(key), f"{task}: {key} differs from lm-eval's definition"
        assert ours["dataset_path"] == "json" and ours["dataset_name"] is None
        for path in ours["dataset_kwargs"]["data_files"].values():
            assert Path(path).is_file()


def test_unknown_task_lists_the_available_ones(capsys):
    code = main(["eval", "zeroshot", "unused", "--tasks", "piqa,mmlu_nonsense"])
    assert code == 2
    error = capsys.readouterr().err
    assert "mmlu_nonsense" in error
    for task in SIX_TASKS.split(","):
        assert task in error


def test_missing_data_file_names_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLICEGPT_DATA_DIR", str(tmp_path))
    code = main(["eval", "zeroshot", "unused", "--tasks", "hellaswag"])
    assert code == 2
    assert str(tmp_path / "hellaswag" / "validation.jsonl") in capsys.readouterr().err


def test_slice_checks_task_data_before_any_work(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "never"
    code = main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(out), "--eval-zeroshot", "piqa",
                 "--data-dir", str(tmp_path / "nowhere")])
    assert code == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not out.exists()


def test_data_directory_discovery(tmp_path, monkeypatch):
    monkeypatch.delenv("SLICEGPT_DATA_DIR", raising=False)
    assert zeroshot.find_data_dir() == SHARED_DATA.resolve()  # ../shared/data next to this checkout
    monkeypatch.setenv("SLICEGPT_DATA_DIR", str(tmp_path))
    assert zeroshot.find_data_dir() == tmp_path
    assert zeroshot.find_data_dir(SHARED_DATA) == SHARED_DATA  # --data-dir beats the variable
    monkeypatch.setattr(zeroshot, "repository_data_dir", lambda: None)
    monkeypatch.delenv("SLICEGPT_DATA_DIR")
    assert zeroshot.find_data_dir() is None
    specs, sources = zeroshot.write_task_files(["piqa", "lambada_openai"], None, tmp_path)
    assert specs == ["piqa", "lambada_openai"] and set(sources.values()) == {"hub"}  # lm-eval's own, from the hub


def test_paper_average_uses_acc_for_winogrande_and_lambada():
    results = {"piqa": {"acc": 0.1, "acc_norm": 0.5}, "winogrande": {"acc": 0.7},
               "lambada_openai": {"acc": 0.3, "perplexity": 20.0}}
    assert zeroshot.average(results) == pytest.approx((0.5 + 0.7 + 0.3) / 3)


def test_bad_task_lists_and_limits():
    with pytest.raises(SliceGPTError, match="no zero-shot tasks"):
        zeroshot.parse_tasks(" , ")
    assert zeroshot.parse_tasks("piqa, piqa ,arc_easy") == ["piqa", "arc_easy"]
    with pytest.raises(SystemExit):
        main(["eval", "zeroshot", "x", "--limit", "two"])


@pytest.mark.slow
def test_smollm2_is_far_above_chance_on_lambada(smollm2_dir):
    """The real model, through the same path: a language model predicts LAMBADA's last words."""
    from slicegpt.io.models import load_model

    model, tokenizer = load_model(smollm2_dir)
    result = zeroshot.evaluate_zeroshot(model, tokenizer, "lambada_openai,piqa", limit=20, batch_size=8)
    lambada, piqa = result["tasks"]["lambada_openai"], result["tasks"]["piqa"]
    assert lambada["acc"] >= 0.2 and lambada["perplexity"] < 100  # chance is ~0 over a 49k vocabulary
    assert piqa["acc_norm"] >= 0.5


@pytest.mark.parametrize("tied_head", [True, False])
def test_sliced_model_is_left_as_it_was(tiny_model_dir, tied_head):
    """lm-eval's wrapper re-ties weights by the config; a sliced model must come out unchanged."""
    from slicegpt import SliceConfig, load_model, slice_model

    model, tokenizer = load_model(str(tiny_model_dir))
    slice_model(model, tokenizer, SliceConfig(sparsity=0.25, tied_head=tied_head),
                random_batches(model.config.vocab_size, seqlen=32), progress=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = model(ids).logits
    zeroshot.evaluate_zeroshot(model, tokenizer, "winogrande", limit=2)
    assert torch.equal(model(ids).logits, before)
