"""The model card lists every number its report holds."""

import json

import pytest
import yaml

from slicegpt.io.model_card import fmt_acc, fmt_ppl, model_card
from slicegpt.io.models import base_model_id


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_lists_the_reports_numbers(tiny_sliced_dir):
    report = json.loads((tiny_sliced_dir / "slicing_report.json").read_text())
    card = (tiny_sliced_dir / "README.md").read_text()
    assert card == model_card(report)
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and "slicegpt" in meta["tags"]
    assert "base_model" not in meta  # a local directory has no hub id
    for name, value in report["params"].items():
        assert f"{value:,}" in card, name
    for value in report["ppl"].values():
        assert fmt_ppl(value) in card
    for column in ("dense", "sliced"):
        result = report["zeroshot"][column]
        assert fmt_acc(result["average"]) in card
        for task, metrics in result["tasks"].items():
            for metric in ("acc", "acc_norm"):
                if metric in metrics:
                    assert fmt_acc(metrics[metric]) in card, (column, task, metric)
    assert f"`{report['config']['cal_samples']}`" in card


def test_card_names_the_hub_base_model():
    report = {"config": {"model": "smollm2-135m", "base_model": base_model_id("smollm2-135m"), "sparsity": 0.25},
              "params": {"dense": 1000, "sliced": 800, "shortcuts": 50, "head": 100}, "ppl": {"dense": 12.5}}
    meta = _front_matter(model_card(report))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "800 (0.800x dense)" in model_card(report)


@pytest.mark.parametrize("name,expected", [("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                           ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
                                           ("./no/such/dir", None), ("model.gguf", None)])
def test_base_model_ids(name, expected):
    assert base_model_id(name) == expected


def test_sliced_dir_passes_its_base_model_on(tiny_sliced_dir, tmp_path):
    report = json.loads((tiny_sliced_dir / "slicing_report.json").read_text())
    report["config"]["base_model"] = "org/base"
    (tmp_path / "slicing_report.json").write_text(json.dumps(report))
    assert base_model_id(str(tmp_path)) == "org/base"


def _report(rotations: str, shortcuts: int, **config) -> dict:
    return {"config": {"model": "m", "sparsity": 0.25, "rotations": rotations, "pca": "raw", **config},
            "params": {"dense": 1000, "sliced": 800, "shortcuts": shortcuts, "head": 10}}


def _prose(card: str) -> str:
    """The card without its configuration table (which lists every setting by name)."""
    return card.split("## Configuration")[0]


def test_one_basis_card_mentions_no_shortcuts_it_does_not_have():
    card = model_card(_report("model", 0, target_params=800, pca="normalized"))
    assert "no shortcut matrices" in card
    assert "shortcut matrix" not in card and "of which shortcut" not in card
    assert "One basis serves the whole residual stream" in card
    assert "Sized to a budget of 800 parameters" in card and "25% of the residual width" not in card
    assert "weighs every token equally" in card
    assert "refit" not in _prose(card) and "fine-tuning" not in _prose(card)


def test_per_block_card_counts_its_shortcuts():
    card = model_card(_report("block", 50))
    assert "a shortcut matrix on the residual path" in card and "(50 parameters in all)" in card
    assert "| of which shortcut matrices | 50 |" in card
    assert "25% of the residual width was removed" in card and "raw activations, as in the paper" in card


def test_refit_and_finetuning_are_described_where_used():
    report = _report("model", 0, refit=True)
    report["finetune"] = {"config": {"lora": {"r": 8, "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj"]},
                                     "steps": 3, "batch_size": 1, "seqlen": 16, "data": "d", "lr": 1e-3},
                          "loss_first": 3.0, "loss_last": 2.0}
    prose = _prose(model_card(report))
    assert "refit by least squares" in prose and "Recovery fine-tuning (LoRA, merged back" in prose
    assert "Each group of 4 consecutive layers" in model_card(_report("group:4", 20))
