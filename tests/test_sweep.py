"""slicegpt sweep: a checkpoint per sparsity, a summary and the perplexity plot."""

import json

from slicegpt.io.checkpoint import load_sliced
from slicegpt.cli import main

from conftest import TINY_CAL_PPL


def test_sweep_writes_checkpoints_summary_and_plot(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(tiny_model_dir), "--sparsities", "0.5,0.25", "--out", str(out), *TINY_CAL_PPL])
    assert code == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [row["sparsity"] for row in summary["sliced"]] == [0.25, 0.5]
    assert summary["sliced"][0]["params"] > summary["sliced"][1]["params"]
    for row in summary["sliced"]:
        directory = out / row["dir"]
        assert load_sliced(directory).config.slicing["embedding_width"] == int(64 * (1 - row["sparsity"]))
        report = json.loads((directory / "slicing_report.json").read_text())
        assert report["ppl"] == {"dense": summary["dense"]["ppl"], "sliced": row["ppl"]}
        assert (directory / "README.md").is_file()
    # The dense model is measured once, in the first run.
    first, second = (json.loads((out / r["dir"] / "slicing_report.json").read_text()) for r in summary["sliced"])
    assert "ppl_dense" in first["timings_s"] and "ppl_dense" not in second["timings_s"]
    assert (out / "ppl_vs_sparsity.png").read_bytes().startswith(b"\x89PNG")
    assert "dense" in capsys.readouterr().out


def test_sweep_refuses_bad_sparsities_before_work(tiny_model_dir, tmp_path, capsys):
    for bad in ("0.1,abc", "0.2,1.5"):
        code = main(["sweep", str(tiny_model_dir), "--sparsities", bad, "--out", str(tmp_path / "never")])
        assert code == 2
    assert not (tmp_path / "never").exists()
    error = capsys.readouterr().err
    assert "comma-separated numbers" in error and "--sparsities: each must be in [0, 1), got 1.5" in error
