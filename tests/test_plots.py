"""Every plot is written, as a non-empty PNG, from the data a report holds."""

import pytest

from slicegpt.evaluation import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _zeroshot(acc: float) -> dict:
    tasks = {"piqa": {"acc": acc, "acc_norm": acc + 0.05}, "winogrande": {"acc": acc}}
    return {"tasks": tasks, "average": (acc + 0.05 + acc) / 2}


REPORT = {
    "widths": {"layers": [{"in": 48, "mid": 48, "out": 48}] * 2},
    "variance_kept": {"embeddings": 0.95, "layer 0 mlp input": 0.97, "layer 0 output": 0.99},
    "zeroshot": {"dense": _zeroshot(0.6), "sliced": _zeroshot(0.55)},
    "finetune": {"zeroshot": {"before": _zeroshot(0.55), "after": _zeroshot(0.58)}},
}
SPECTRA = {name: [10.0 / (i + 1) for i in range(64)] for name in REPORT["variance_kept"]}


def test_report_plots_writes_every_plot_it_has_data_for():
    files = plots.report_plots(REPORT, SPECTRA, losses=[3.0 - 0.01 * i for i in range(50)])
    assert set(files) == {"spectra.png", "variance_kept.png", "zeroshot.png", "zeroshot_finetune.png",
                          "loss_curve.png"}
    for name, data in files.items():
        assert data.startswith(PNG) and len(data) > 5_000, name


def test_report_plots_skips_what_was_not_measured():
    assert set(plots.report_plots({"variance_kept": REPORT["variance_kept"], "zeroshot": {}})) == \
        {"variance_kept.png"}


@pytest.mark.parametrize("figure", [
    lambda: plots.ppl_figure([{"sparsity": 0.1, "ppl": 20.0}, {"sparsity": 0.3, "ppl": 35.0}], dense_ppl=18.0),
    lambda: plots.ppl_figure([{"sparsity": 0.1, "ppl": 20.0}, {"sparsity": 0.5, "ppl": 2_000.0}]),  # log scale
    lambda: plots.loss_figure([2.5]),  # a single step
    lambda: plots.spectra_figure({"only": [1.0, 0.0, 0.0]}),  # zero eigenvalues on a log axis
])
def test_figures_render(figure):
    assert plots.png_bytes(figure()).startswith(PNG)
