"""bench/results_table.py: the README's results block is what the JSON says, and nothing is invented."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rt():
    return load_bench_script("results_table")


def test_readme_block_is_generated_from_the_results(rt):
    """Fails when a result changes and the README was not regenerated (python bench/results_table.py)."""
    for path, wanted in rt.generated().items():
        assert path.read_text() == wanted, path


def test_missing_measurements_show_as_not_measured(rt, tmp_path):
    text = rt.table(tmp_path)
    assert text.count("| not measured | not measured | not measured | not measured |") == len(rt.MODELS)
    assert "no row of `python bench/zeroshot.py` has finished yet" in text
    assert rt.zeroshot_table(tmp_path).startswith("No row")


def test_zeroshot_rows_fill_the_table(rt, tmp_path):
    shutil.copy(ROOT / "bench" / "results" / "speed_auto.json", tmp_path)
    rows = []
    for model, params, shift in (("dense", 1000, 0.0), ("default-25", 800, 0.05)):
        for task in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai"):
            value = 0.6 - shift
            rows.append({"model": model, "task": task, "limit": 500, "spec": {}, "params": params,
                         "metrics": {"acc": value, "acc_norm": value, "acc_stderr": 0.02, "acc_norm_stderr": 0.02},
                         "commit": "abc1234", "finished": "2026-12-01T03:00:00+00:00"})
    rows.append({**rows[0], "model": "paper-25", "params": 900})
    (tmp_path / "zeroshot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = rt.table(tmp_path)
    # dense: 0.6 everywhere; above chance (0.1+0.35*3+0.1+0.6)/6 = 0.30833
    assert "| SmolLM2-135M, dense | 0.00M | not measured | 60.00 (30.83; 100%) | 22.6 tok/s (1.00 ×) |" in text
    assert "55.00 (25.83; 84%)" in text
    assert "not measured (1 of 6 tasks so far)" in text
    assert "commits abc1234" in text and "2026-12-01" in text
    per_task = rt.zeroshot_table(tmp_path)
    assert "| default-25 | 0.00M | 55.0 ± 2.0 |" in per_task and "| 25.83 | 84% |" in per_task
    assert "| paper-25 | 0.00M | 60.0 ± 2.0 | – |" in per_task
    assert rt.plot(tmp_path, tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_fine_tuned_rows_take_their_perplexity_from_rft_rows(rt, tmp_path):
    row = {"variant": "default-25+rft", "params": 110_420_000, "ppl_wikitext2_test": 33.25, "ppl_lambada": 80.0,
           "commit": "def5678", "finished": "2026-12-01T10:00:00+00:00"}
    (tmp_path / "rft.jsonl").write_text(json.dumps(row) + "\n" + '{"variant": "dense+rft", "par')  # a cut line
    text = rt.table(tmp_path)
    assert "| `--sparsity 0.25 --no-refit`, then `finetune` | 110.42M | 33.25 | not measured | not measured |" in text
    assert "| dense, then the same fine-tuning | not measured | not measured |" in text
    assert "`python bench/rft.py` → `rft.jsonl`" in text and "def5678" in text
