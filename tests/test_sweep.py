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


def test_a_stopped_sweep_resumes_keeping_the_finished_sparsities(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import slicegpt.commands.sweep as sweep

    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny_model_dir), "--sparsities", "0.25,0.5", "--out", str(out), *TINY_CAL_PPL]
    slice_and_save, sliced = sweep.slice_and_save, []

    def stopped_after(count):
        def slice_or_stop(args, config, *rest, **options):
            if len(sliced) == count:
                raise KeyboardInterrupt  # as Ctrl-C, or a kill between two sparsities
            sliced.append(config.sparsity)
            return slice_and_save(args, config, *rest, **options)
        return slice_or_stop

    monkeypatch.setattr(sweep, "slice_and_save", stopped_after(1))
    assert main(argv) == 130
    weights = out / "sparsity-0.25" / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    summary = json.loads((out / "sweep.json").read_text())
    assert not summary["complete"] and [row["sparsity"] for row in summary["sliced"]] == [0.25]

    # Other settings into the same output are refused, naming what differs.
    assert main(argv + ["--cal-samples", "2"]) == 2
    assert "holds a sweep with other settings (cal_samples)" in capsys.readouterr().err

    sliced.clear()
    monkeypatch.setattr(sweep, "slice_and_save", stopped_after(None))
    assert main(argv) == 0  # the same command, no --overwrite
    assert sliced == [0.5] and "resuming the sweep" in capsys.readouterr().err
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] and [row["sparsity"] for row in summary["sliced"]] == [0.25, 0.5]
    second = json.loads((out / "sparsity-0.50" / "slicing_report.json").read_text())
    assert "ppl_dense" not in second["timings_s"] and second["ppl"]["dense"] == summary["dense"]["ppl"]
    assert (out / "ppl_vs_sparsity.png").read_bytes().startswith(b"\x89PNG")

    sliced.clear()
    monkeypatch.setattr(sweep, "slice_and_save", stopped_after(1))
    assert main(argv + ["--overwrite"]) == 130  # starts over: slices 0.25 again
    assert sliced == [0.25]
