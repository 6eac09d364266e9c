"""bench/distill.py: its third corpus, the choice of the recipe trained in full, its table; and the README rows."""

import json

from conftest import SHARED_DATA, load_bench_script


def _rows(recipe: str, ppl: tuple[float, float, float], accuracy: float | None = None, **extra) -> list[dict]:
    rows = [{"recipe": recipe, "eval": corpus, "ppl": value, "params": 100e6, "spec": {"recipe": {}},
             "commit": "abc1234", "finished": "2026-12-05T09:00:00+00:00"}
            for corpus, value in zip(("wikitext2", "lambada", "hellaswag_text"), ppl)]
    if accuracy is not None:
        tasks = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai"]
        rows += [{"recipe": recipe, "eval": f"zeroshot:{t}", "params": 100e6, "spec": {"recipe": {}},
                  "metrics": {"acc": accuracy, "acc_norm": accuracy}, "commit": "abc1234",
                  "finished": "2026-12-05T09:00:00+00:00"} for t in tasks]
    return [r | extra for r in rows]


def test_the_third_corpus_is_hellaswag_passages_past_the_zero_shot_examples():
    distill = load_bench_script("distill")
    passages = distill.third_corpus()
    first = json.loads((SHARED_DATA / "hellaswag" / "validation.jsonl").read_text().splitlines()[500])
    assert passages[0] == f"{first['ctx']} {first['endings'][int(first['label'])]}"
    assert len(passages) == 10042 - 500


def test_best_full_takes_the_recipe_with_the_lowest_mean_ratio(tmp_path):
    distill = load_bench_script("distill")
    rows = tmp_path / "rows.jsonl"
    for row in (_rows("dense", (20, 40, 30)) + _rows("a-lm-wikitext", (26, 110, 60))
                + _rows("b-kl-wikitext", (28, 80, 50)) + _rows("c-kl-teacher", (30, 75, 48))):
        distill.zeroshot.append_row(rows, row)
    bench = distill.Bench(quick=False, rows=rows, threads=2)
    spec = bench.spec("best-full")
    assert spec["recipe"]["from"] == "c-kl-teacher" and spec["recipe"]["full"]
    assert spec["train"]["lr"] == distill.FULL["full_lr"] and spec["teacher_text"]["tokens"] == distill.BUDGET_TOKENS
    table = distill.summary_table(distill.zeroshot.read_rows(rows), distill.zeroshot.TASKS).splitlines()
    assert "1.30x" in table[2] and "2.75x" in table[2]  # a: 26/20, 110/40


def test_readme_gains_the_recovery_rows_once_they_exist(tmp_path):
    table = load_bench_script("results_table")
    rows = (_rows("dense", (20, 40, 30), 0.5) + _rows("c-kl-teacher", (28, 75, 48), 0.4)
            + _rows("slice", (40, 100, 70), 0.35, quick=True))
    (tmp_path / "distill.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = table.table(tmp_path)
    line = next(l for l in text.splitlines() if "--distill --data teacher" in l)
    assert "| 28.00 |" in line and "100.00M" in line
    assert "40.00 (" in line and "%)" in line
    assert "cal-data teacher" not in text  # no rows for it; quick rows are not shown
    assert "bench/distill.py" in text


def test_dense_and_slice_take_zero_shot_rows_over_from_zeroshot_py(tmp_path, monkeypatch):
    distill = load_bench_script("distill")
    measured = tmp_path / "zeroshot.jsonl"
    for model in ("dense", "refit-25", "refit-20"):
        distill.zeroshot.append_row(measured, {"model": model, "task": "piqa", "limit": 500, "seconds": 9.0,
                                               "metrics": {"acc_norm": 0.6 if model == "refit-25" else 0.1},
                                               "commit": "abc1234", "finished": "2026-12-01T00:00:00+00:00"})
    monkeypatch.setattr(distill.zeroshot, "ROWS", measured)
    bench = distill.Bench(quick=False, rows=tmp_path / "rows.jsonl", threads=2)
    row = bench.borrowed_zeroshot("slice", "piqa")
    assert row["metrics"] == {"acc_norm": 0.6} and row["borrowed_from"]["model"] == "refit-25"
    assert bench.borrowed_zeroshot("slice", "arc_easy") is None  # not measured there
    assert bench.borrowed_zeroshot("c-kl-teacher", "piqa") is None  # a new model is measured
    assert distill.Bench(quick=True, rows=tmp_path / "q.jsonl", threads=2).borrowed_zeroshot("dense", "piqa") is None


def test_the_self_distillation_check_trains_a_quarter_of_the_budget_on_the_whole_text(tmp_path):
    distill = load_bench_script("distill")
    bench = distill.Bench(quick=False, rows=tmp_path / "rows.jsonl", threads=2)
    check, recovery = bench.spec("dense-self-kl"), bench.spec("c-kl-teacher")
    assert check["train"]["steps"] == distill.STEPS // 4 and recovery["train"]["steps"] == distill.STEPS
    assert check["teacher_text"] == recovery["teacher_text"]  # the same text file serves both
