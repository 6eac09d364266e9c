"""bench/harness.py: result files that resume, functions and commands in processes of their own,
and "slice, then measure" on a tiny model."""

import dataclasses
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import WIKITEXT_TEST, load_bench_script


@pytest.fixture(scope="module")
def hn():
    return load_bench_script("harness")


def test_a_rows_file_resumes_past_a_line_cut_short(hn, tmp_path):
    rows = hn.RowsFile(tmp_path / "rows.jsonl", key=lambda row: (row["model"], row["task"]))
    assert rows.rows() == [] and rows.measured() == set()
    rows.add({"model": "dense", "task": "piqa", "acc": 0.6})
    with open(rows.path, "a") as handle:
        handle.write('{"model": "dense", "task": "wino')  # a kill in the middle of a write
    assert rows.measured() == {("dense", "piqa")}
    rows.add({"model": "dense", "task": "winogrande", "acc": 0.5})  # ends the cut line first
    again = hn.RowsFile(rows.path, key=rows.key)
    assert again.measured() == {("dense", "piqa"), ("dense", "winogrande")}
    assert [row["acc"] for row in again.rows()] == [0.6, 0.5]
    assert len(rows.path.read_text().splitlines()) == 3


def test_a_rows_document_is_rewritten_whole_after_each_row(hn, tmp_path):
    path = tmp_path / "results" / "p.json"
    document = lambda rows: {"protocol": "P", "rows": rows, "count": len(rows)}  # noqa: E731
    store = hn.RowsDocument(path, lambda row: row["sparsity"], document)
    store.add({"sparsity": 0.2, "ppl": 30.0})
    assert json.loads(path.read_text()) == {"protocol": "P", "rows": [{"sparsity": 0.2, "ppl": 30.0}], "count": 1}
    store.add({"sparsity": 0.25, "ppl": 40.0})
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # nothing half-written left beside it
    resumed = hn.RowsDocument(path, store.key, document)
    assert resumed.measured() == {0.2, 0.25} and json.loads(path.read_text())["count"] == 2
    fresh = hn.RowsDocument(path, store.key, document, fresh=True)
    assert fresh.rows() == [] and json.loads(path.read_text())["count"] == 2  # replaced at its first row
    fresh.add({"sparsity": 0.3, "ppl": 50.0})
    assert json.loads(path.read_text())["rows"] == [{"sparsity": 0.3, "ppl": 50.0}]


def _module(tmp_path, source: str):
    path = tmp_path / "jobs_for_test.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("jobs_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_function_runs_in_a_process_of_its_own(hn, tmp_path):
    jobs = _module(tmp_path, "import os\n\n"
                             "def describe(settings, count):\n"
                             "    print('chatter on standard output')\n"
                             "    return {'pid': os.getpid(), 'settings': settings, 'twice': 2 * count}\n\n"
                             "def fail():\n"
                             "    raise ValueError('no such model')\n")
    # Wrapped by a decorator that lives in another file, as torch.no_grad() wraps: the function's file counts.
    wrapped = functools.wraps(jobs.describe)(lambda *args: jobs.describe(*args))
    result = hn.run_isolated(wrapped, {"sparsity": 0.25}, 21)
    assert result["settings"] == {"sparsity": 0.25} and result["twice"] == 42
    assert result["pid"] != os.getpid()
    with pytest.raises(SystemExit, match="no such model"):
        hn.run_isolated(jobs.fail)


def test_a_watched_command_reports_its_own_peak_memory_and_output(hn):
    code = "import time; block = b'x' * (96 * 2**20); time.sleep(1.2); print('done')"
    watched = hn.run_watched([sys.executable, "-c", code], every_s=0.2)
    assert watched.returncode == 0 and watched.stdout == "done\n"
    assert watched.peak_rss_bytes >= 96 * 2**20 and watched.wall_s >= 1.2
    assert watched.rss_samples and max(rss for _, rss in watched.rss_samples) >= 96 * 2**20
    assert all(later >= earlier for (earlier, _), (later, _) in zip(watched.rss_samples, watched.rss_samples[1:]))
    failed = hn.run_watched([sys.executable, "-c", "import sys; sys.exit('gave up')"])
    assert failed.returncode == 1 and "gave up" in failed.stderr


def test_paths_and_names(hn):
    assert hn.WIKITEXT_TEST == WIKITEXT_TEST and hn.CAL_DATA.is_file() and hn.LAMBADA.is_file()
    assert hn.shown(hn.RESULTS / "x.json") == Path("bench/results/x.json") and hn.shown(Path("/x")) == Path("/x")
    assert hn.slicegpt_command("slice", "m") == [sys.executable, "-m", "slicegpt.cli", "slice", "m"]
    assert hn.ppl_field("wikitext2", "dense") == "ppl_dense"
    assert hn.ppl_field("lambada", "sliced") == "ppl_lambada_sliced"


def test_measure_slice_on_a_tiny_model(hn, tiny_model_dir):
    run = hn.SliceRun(settings={"sparsity": 0.25}, model=str(tiny_model_dir), cal_samples=2, cal_seqlen=32,
                      ppl_chunks=1, ppl_seqlen=32, dense=True, baseline=True, threads=1)
    row = hn.measure_slice(run)
    assert list(row) == ["params_dense", "ppl_dense", "ppl_lambada_dense", "dense_forward_s", "calibrate_and_slice_s",
                         "ppl_sliced", "ppl_lambada_sliced", "rotations", "pca", "widths", "width", "params_sliced",
                         "params_shortcuts", "params_head", "params_post_norm_maps", "peak_rss_gib"]
    assert row["params_sliced"] < row["params_dense"] and row["width"] < 64
    assert row["ppl_sliced"] > 1 and row["ppl_dense"] > 1 and row["dense_forward_s"] > 0
    assert row["params_post_norm_maps"] == 0
    # In a process of its own, the same slice (no perplexity asked for here, to keep the test short).
    apart = hn.measure_slice_isolated(dataclasses.replace(run, corpora=[], dense=False, baseline=False))
    assert not [field for field in apart if field.startswith("ppl_")] and "dense_forward_s" not in apart
    assert (apart["params_sliced"], apart["width"]) == (row["params_sliced"], row["width"])
