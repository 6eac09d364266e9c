"""bench/protocol_p.py, bench/layouts.py, bench/gemma3.py and bench/size_quality.py without
slicing: what each slice measures, the rows they keep and skip on a rerun, and that the recorded
results still read."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import load_bench_script

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.fixture(scope="module")
def pp():
    return load_bench_script("protocol_p")


@pytest.fixture()
def results(pp, tmp_path, monkeypatch):
    """Results written under tmp_path instead of bench/results."""
    monkeypatch.setattr(pp.harness, "RESULTS", tmp_path)
    return tmp_path


def stand_in(calls):
    """measure_slice's row for a SliceRun, without a model; the calls recorded."""
    def measure(run):
        calls.append(run)
        sparsity = run.settings.get("sparsity", 0.25)
        row = {"params_dense": 1000, "calibrate_and_slice_s": 12.0, "ppl_sliced": 40.0 + 100 * (sparsity - 0.25),
               "ppl_lambada_sliced": 90.0, "rotations": "model", "pca": "normalized", "widths": "uniform",
               "width": 48, "params_sliced": int(1000 * (1 - sparsity)), "params_shortcuts": 0, "params_head": 0,
               "params_post_norm_maps": 0, "peak_rss_gib": 1.5}
        if run.dense:
            row |= {"ppl_dense": 20.0, "ppl_lambada_dense": 36.0}
        if run.baseline:
            row["dense_forward_s"] = 8.0
        return row
    return measure


def test_protocol_p_measures_each_sparsity_once_with_the_dense_model_at_25(pp, results):
    calls = []
    store = pp.measure([0.2, 0.25], quick=True, measure_slice=stand_in(calls))
    assert store.path == results / "protocol_p_quick.json"
    assert [run.settings for run in calls] == [{"sparsity": 0.2}, {"sparsity": 0.25}]
    assert [(run.dense, run.baseline) for run in calls] == [(False, False), (True, True)]
    assert calls[0].cal_samples == 4 and calls[0].ppl_chunks == 1 and calls[0].corpora == ["wikitext2", "lambada"]
    data = json.loads(store.path.read_text())
    assert list(data["rows"][1]) == ["sparsity", "variant", "params_dense", "ppl_dense", "ppl_lambada_dense",
                                     "dense_forward_s", "calibrate_and_slice_s", "ppl_sliced", "ppl_lambada_sliced",
                                     "params_sliced", "params_shortcuts", "params_head", "peak_rss_gib"]
    assert data["quick"] and data["threads"] == 2 and data["device"] == "cpu" and data["original"] == pp.ORIGINAL
    assert data["summary"]["ppl_ratio_25"] == 2.0 and data["summary"]["cost_ratio_25"] == 1.5

    calls.clear()
    pp.measure([0.25, 0.3], quick=True, measure_slice=stand_in(calls))  # 0.25 is there already
    assert [run.settings for run in calls] == [{"sparsity": 0.3}]
    pp.measure([0.25], "refit=true,rotations=block", quick=True, dense=False, refit_damping=0.1,
               measure_slice=stand_in(calls))  # a variant is another measurement
    assert calls[-1].settings == {"sparsity": 0.25, "refit": True, "rotations": "block"}
    assert (calls[-1].dense, calls[-1].baseline, calls[-1].refit_damping) == (False, False, 0.1)
    rows = json.loads(store.path.read_text())["rows"]
    assert [(r["sparsity"], r["variant"]) for r in rows] == [(0.2, ""), (0.25, ""), (0.3, ""),
                                                             (0.25, "refit=true,rotations=block")]


def test_protocol_p_names_its_files_and_parses_variants(pp):
    assert pp.results_path().name == "protocol_p.json"
    assert pp.results_path("layouts").name == "protocol_p_layouts.json"
    assert pp.results_path("x", quick=True, device="cuda:0").name == "protocol_p_quick_cuda_x.json"
    assert pp.parse_variant("refit=true,refit_share=1.0,target_params=103148800,rotations=group:10") == \
        {"refit": True, "refit_share": 1.0, "target_params": 103148800, "rotations": "group:10"}


@pytest.mark.parametrize("path", sorted(RESULTS.glob("protocol_p*.json")), ids=lambda p: p.name)
def test_recorded_protocol_p_results_still_read(pp, path):
    data = json.loads(path.read_text())
    assert pp.summarise(data["rows"]) == data["summary"]


def test_layouts_spend_the_per_block_size_on_shared_bases(results):
    layouts = load_bench_script("layouts")
    calls = []
    layouts.measure([0.3], ["block", "model-refit"], {0.3: 103148800}, threads=2, measure_slice=stand_in(calls))
    assert [run.settings for run in calls] == [
        {"sparsity": 0.3, "rotations": "block", "refit": False},
        {"sparsity": 0.3, "rotations": "model", "refit": True, "target_params": 103148800}]
    assert not any(run.dense or run.baseline for run in calls)
    rows = json.loads((results / "protocol_p_layouts.json").read_text())["rows"]
    assert [layouts.layout_of(row) for row in rows] == ["block", "model-refit"]
    recorded = json.loads((RESULTS / "protocol_p_layouts.json").read_text())["rows"]
    assert {layouts.layout_of(row) for row in recorded} <= set(layouts.LAYOUTS)


def test_gemma3_measures_the_dense_model_with_the_first_configuration(tmp_path):
    gemma3 = load_bench_script("gemma3")
    calls, isolated = [], []
    first, other = list(gemma3.CONFIGS)[:2]
    row = gemma3.measure(first, dense=True, threads=2, quick=True, measure_slice=stand_in(calls))
    assert list(row)[:3] == ["config", "settings", "params_dense"] and row["config"] == first
    assert calls[0].model == "gemma3-270m" and calls[0].cal_batch_size == 8 and calls[0].cal_samples == 2
    assert calls[0].dense and calls[0].baseline and calls[0].settings == gemma3.CONFIGS[first]
    gemma3.measure(other, dense=False, threads=2, quick=False, measure_slice=stand_in(calls))
    assert not calls[1].dense and calls[1].cal_samples == 64
    gemma3.measure(gemma3.MEAN_SCALE, dense=False, threads=2, quick=False,
                   run_isolated=lambda function, *args: isolated.append((function.__name__, args)) or {})
    assert isolated == [("mean_scale_run", (16, 2))]
    for path in RESULTS.glob("gemma3*.json"):
        data = json.loads(path.read_text())
        assert gemma3.summarise(data["rows"]) == data["summary"]


def test_size_quality_rows_come_from_measure_slice(monkeypatch):
    size_quality = load_bench_script("size_quality")
    calls = []
    monkeypatch.setattr(size_quality.harness, "measure_slice", stand_in(calls))
    args = SimpleNamespace(cal_samples=16, cal_seqlen=2048, ppl_chunks=4, threads=2)
    row = size_quality.run_variant("model-b25", args)
    label, settings = size_quality.VARIANTS["model-b25"]
    assert row == {"key": "model-b25", "label": label, "settings": settings, "width": 48, "params": 750,
                   "shortcuts": 0, "head": 0, "ppl": 40.0, "slice_s": 12.0}
    assert calls[0].settings == settings and calls[0].corpora == ["wikitext2"]
    assert (calls[0].cal_samples, calls[0].ppl_chunks, calls[0].dense) == (16, 4, False)
    recorded = json.loads((RESULTS / "size_quality_p_c.json").read_text())["rows"]
    assert all(list(old) == list(row) for old in recorded if old.get("key"))
