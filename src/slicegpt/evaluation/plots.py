"""The plots every run writes next to its JSON: spectra, variance kept, perplexity
against slicing, zero-shot accuracy, the fine-tuning loss.

Figures are built with matplotlib's object API on the Agg canvas, so nothing here
touches pyplot's global state or needs a display.
"""

from __future__ import annotations

from slicegpt.tasks import paper_metric

import io

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def spectra_figure(spectra: dict[str, list[float]], kept_width: int | None = None) -> Figure:
    """Eigenvalues of each calibration covariance, largest first, scaled by their sum."""
    figure, ax = _figure()
    colourmap = matplotlib.colormaps["viridis"]
    count = max(len(spectra) - 1, 1)
    for index, (name, values) in enumerate(spectra.items()):
        total = sum(values) or 1.0
        scaled = [max(v / total, 1e-12) for v in values]
        ax.plot(range(1, len(scaled) + 1), scaled, color=colourmap(index / count), linewidth=0.8,
                label=name if index in (0, len(spectra) - 1) else None)
    if kept_width is not None:
        ax.axvline(kept_width, color="black", linestyle="--", linewidth=1, label=f"kept width {kept_width}")
    ax.set_yscale("log")
    ax.set_xlabel("principal component")
    ax.set_ylabel("eigenvalue / sum of eigenvalues")
    ax.set_title("PCA spectrum of the residual stream (colour: depth)")
    ax.legend(fontsize=8)
    return figure


def variance_kept_figure(variance_kept: dict[str, float]) -> Figure:
    """The fraction of calibration variance the kept directions hold, at each point of the stream."""
    figure, ax = _figure()
    names = list(variance_kept)
    ax.plot(range(len(names)), [100 * v for v in variance_kept.values()], marker="o", markersize=3)
    step = max(1, len(names) // 12)
    ax.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)],
                  rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("variance kept (%)")
    ax.set_title("Fraction of variance kept per layer")
    ax.grid(alpha=0.3)
    return figure


def ppl_figure(rows: list[dict], dense_ppl: float | None = None) -> Figure:
    """Perplexity against slicing; rows hold "sparsity" and "ppl" (and optionally "params")."""
    figure, ax = _figure()
    ax.plot([100 * r["sparsity"] for r in rows], [r["ppl"] for r in rows], marker="o", label="sliced")
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="grey", linestyle="--", label=f"dense ({dense_ppl:.2f})")
    ax.set_xlabel("slicing (% of residual width removed)")
    ax.set_ylabel("perplexity")
    if rows and max(r["ppl"] for r in rows) / max(min(r["ppl"] for r in rows), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title("Perplexity against slicing")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def zeroshot_figure(results: dict[str, dict]) -> Figure:
    """Grouped bars: the paper's metric per task and the average, one bar per result (dense, sliced, ...)."""

    figure, ax = _figure(8.0, 4.2)
    labels = list(results)
    tasks = list(next(iter(results.values()))["tasks"])
    groups = [*tasks, "average"]
    width = 0.8 / max(len(labels), 1)
    for offset, label in enumerate(labels):
        values = [results[label]["tasks"][t][paper_metric(t)] for t in tasks] + [results[label]["average"]]
        positions = [i + (offset - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(positions, [100 * v for v in values], width, label=label)
    ax.set_xticks(range(len(groups)), [f"{t}\n({paper_metric(t)})" for t in tasks] + ["average"], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Zero-shot accuracy")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return figure


def loss_figure(losses: list[float], heldout: list[dict] | None = None, ylabel: str = "cross-entropy loss") -> Figure:
    """Training loss per step, with a moving average, and the held-out points (both corpora) where measured."""
    figure, ax = _figure()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, alpha=0.4, linewidth=0.8, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    names = {"kl": "held-out KL", "loss": "held-out LM loss", "second_kl": "second corpus KL",
             "second_loss": "second corpus LM loss"}
    for key, name in names.items():
        points = [(p["step"], p[key]) for p in heldout or [] if key in p]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title("Recovery fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def report_plots(report: dict, spectra: dict | None = None, losses: list[float] | None = None) -> dict[str, bytes]:
    """Every plot a slicing (or fine-tuning) report supports, as PNG bytes keyed by file name."""
    plots = {}
    if spectra:
        widths = report.get("widths", {}).get("layers") or []
        kept = widths[0].get("in") if widths and len({w.get("in") for w in widths}) == 1 else None
        plots["spectra.png"] = png_bytes(spectra_figure(spectra, kept))
    if report.get("variance_kept"):
        plots["variance_kept.png"] = png_bytes(variance_kept_figure(report["variance_kept"]))
    zeroshot = {k: v for k, v in (report.get("zeroshot") or {}).items() if v}
    if zeroshot:
        plots["zeroshot.png"] = png_bytes(zeroshot_figure(zeroshot))
    finetuned = {k: v for k, v in ((report.get("finetune") or {}).get("zeroshot") or {}).items() if v}
    if finetuned:
        plots["zeroshot_finetune.png"] = png_bytes(zeroshot_figure(finetuned))
    if losses:
        finetune = report.get("finetune") or {}
        ylabel = "cross-entropy loss" if finetune.get("objective", "next-token loss") == "next-token loss" else "loss"
        plots["loss_curve.png"] = png_bytes(loss_figure(losses, finetune.get("heldout_losses"), ylabel))
    return plots
