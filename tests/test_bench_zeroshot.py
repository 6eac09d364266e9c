"""bench/zeroshot.py: rows appended as they finish, skipped on a rerun, and the summary's arithmetic."""

import json

import pytest
import torch

from slicegpt import load_sliced

from conftest import load_bench_script, make_tiny_model, random_batches



@pytest.fixture(scope="module")
def zs():
    return load_bench_script("zeroshot")


SPECS = {"dense": {}, "sliced": {"slice": {"sparsity": 0.25}}}
TASKS = ["piqa", "winogrande"]


def fake_evaluate(calls, fail_at=None):
    def evaluate(model, tokenizer, task):
        calls.append((model.tag, task))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        value = {"piqa": 0.7, "winogrande": 0.6}[task] - (0.1 if model.tag == "sliced" else 0.0)
        return {"acc": value, "acc_stderr": 0.01, "acc_norm": value, "acc_norm_stderr": 0.01, "samples": 5}
    return evaluate


def fake_build(built):
    def build(name):
        built.append(name)
        model = make_tiny_model("LlamaForCausalLM", tied=True)
        model.tag = name
        return model, None, sum(p.numel() for p in model.parameters())
    return build


def test_rows_are_appended_as_they_finish_and_skipped_on_rerun(zs, tmp_path):
    rows = tmp_path / "rows.jsonl"
    calls, built = [], []
    with pytest.raises(KeyboardInterrupt):  # killed during the third task
        zs.run(list(SPECS), TASKS, 5, rows, fake_build(built), fake_evaluate(calls, fail_at=3), {"commit": "x"},
               specs=SPECS)
    assert [(r["model"], r["task"]) for r in zs.read_rows(rows)] == [("dense", "piqa"), ("dense", "winogrande")]
    with open(rows, "a") as handle:
        handle.write('{"model": "sliced", "task": "pi')  # a line cut short by the kill
    calls, built = [], []
    new = zs.run(list(SPECS), TASKS, 5, rows, fake_build(built), fake_evaluate(calls), {"commit": "x"}, specs=SPECS)
    assert built == ["sliced"] and calls == [("sliced", "piqa"), ("sliced", "winogrande")]
    assert len(new) == 2 and len(zs.read_rows(rows)) == 4
    calls, built = [], []
    assert zs.run(list(SPECS), TASKS, 5, rows, fake_build(built), fake_evaluate(calls), {}, specs=SPECS) == []
    assert built == [] and calls == []
    # Another limit or other settings are other measurements.
    zs.run(["dense"], TASKS, 6, rows, fake_build(built), fake_evaluate(calls), {}, specs=SPECS)
    other = {"dense": {"slice": {"sparsity": 0.3}}}
    zs.run(["dense"], ["piqa"], 5, rows, fake_build(built), fake_evaluate(calls), {}, specs=other)
    assert built == ["dense", "dense"] and len(calls) == 3


def test_summary_above_chance_and_retention(zs, tmp_path):
    rows = tmp_path / "rows.jsonl"
    zs.run(list(SPECS), TASKS, 5, rows, fake_build([]), fake_evaluate([]), {}, specs=SPECS)
    zs.run(["dense"], TASKS, 7, rows, fake_build([]), fake_evaluate([]), {}, specs=SPECS)  # another limit: ignored
    summary = zs.summarize(zs.read_rows(rows), TASKS, 5)
    dense, sliced = summary["dense"], summary["sliced"]
    assert dense["average"] == pytest.approx(0.65) and dense["above_chance"] == pytest.approx(0.15)
    assert sliced["above_chance"] == pytest.approx(0.05)
    assert sliced["retention"] == pytest.approx(0.05 / 0.15) and dense["retention"] == pytest.approx(1.0)
    assert sliced["tasks"]["winogrande"] == {"metric": "acc", "value": pytest.approx(0.5), "stderr": 0.01,
                                             "samples": 5}
    partial = zs.summarize(zs.read_rows(rows), [*TASKS, "hellaswag"], 5)
    assert not partial["dense"]["complete"] and "average" not in partial["dense"]
    assert "dense" in zs.format_summary(summary, TASKS)


def test_build_model_slices_once_and_reuses_the_saved_model(zs, tmp_path):
    calls = []

    def load_dense():
        calls.append("dense")
        return make_tiny_model("LlamaForCausalLM", tied=True), None

    def load_cached(directory):
        calls.append("cached")
        return load_sliced(directory), None

    specs = {"s": {"slice": {"sparsity": 0.25}}}
    model, _, params = zs.build_model("s", load_dense, random_batches(96), specs=specs, cache=tmp_path,
                                      load_cached=load_cached)
    assert calls == ["dense"] and json.loads((tmp_path / "s" / "config.json").read_text())["slicing"]
    again, _, params_again = zs.build_model("s", load_dense, random_batches(96), specs=specs, cache=tmp_path,
                                            load_cached=load_cached)
    dense = sum(p.numel() for p in make_tiny_model("LlamaForCausalLM", tied=True).parameters())
    assert calls == ["dense", "cached"] and params_again == params < dense
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-5)


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [sum(map(ord, word)) % 90 + 1 for word in text.split()]}

    def save_pretrained(self, directory):
        pass


def test_build_model_fine_tunes_the_dense_model_and_keeps_it(zs, tmp_path):
    pytest.importorskip("peft")
    specs = {"d+rft": {"rft": {"steps": 2, "seqlen": 8, "batch_size": 1, "lr": 1e-3, "seed": 0}}}
    texts = [" ".join(f"w{i % 40}" for i in range(200))]
    dense = make_tiny_model("LlamaForCausalLM", tied=True)
    model, _, params = zs.build_model("d+rft", lambda: (make_tiny_model("LlamaForCausalLM", tied=True),
                                                        _WordTokenizer()), texts, specs=specs, cache=tmp_path)
    assert (tmp_path / "d+rft" / "model.safetensors").is_file()
    assert params == sum(p.numel() for p in dense.parameters())  # merged back: no extra parameters
    ids = torch.randint(1, 90, (1, 8))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() > 1e-5
    record = json.loads((tmp_path / "d+rft" / zs.RFT_RECORD).read_text())
    assert len(record["losses"]) == 2


def test_a_changed_spec_rebuilds_the_cached_model(zs, tmp_path):
    calls = []

    def load_dense():
        calls.append("dense")
        return make_tiny_model("LlamaForCausalLM", tied=True), None

    zs.build_model("s", load_dense, random_batches(96), specs={"s": {"slice": {"sparsity": 0.25}}}, cache=tmp_path,
                   load_cached=lambda d: (load_sliced(d), None))
    _, _, params = zs.build_model("s", load_dense, random_batches(96), specs={"s": {"slice": {"sparsity": 0.5}}},
                                  cache=tmp_path, load_cached=lambda d: (load_sliced(d), None))
    assert calls == ["dense", "dense"]
    assert json.loads((tmp_path / "s" / zs.SPEC_FILE).read_text()) == {"slice": {"sparsity": 0.5}}


def test_fine_tuning_starts_from_the_cached_slice(zs, tmp_path):
    pytest.importorskip("peft")
    calls = []

    def load_dense():
        calls.append("dense")
        return make_tiny_model("LlamaForCausalLM", tied=True), _WordTokenizer()

    def load_cached(directory):
        calls.append(directory.name)
        return load_sliced(directory), _WordTokenizer()

    texts = [" ".join(f"w{i % 40}" for i in range(200))]
    rft = {"steps": 1, "seqlen": 8, "batch_size": 1, "lr": 1e-3, "seed": 0}
    specs = {"s": {"slice": {"sparsity": 0.25}}, "s+rft": {"slice": {"sparsity": 0.25}, "rft": rft}}
    zs.build_model("s", load_dense, random_batches(96), specs=specs, cache=tmp_path, load_cached=load_cached)
    # Only text to fine-tune on: slicing again would fail, so passing means the slice was reused.
    zs.build_model("s+rft", load_dense, texts, specs=specs, cache=tmp_path, load_cached=load_cached)
    assert calls == ["dense", "s"]
