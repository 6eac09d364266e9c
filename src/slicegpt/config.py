"""The settings of one slicing run, as a plain dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slicegpt.errors import SliceGPTError
from slicegpt.checks import check_number, check_slice_values

CONFIG_VERSION = 1
WIDTHS = ("auto", "uniform", "variance", "embedding")  # see SliceConfig.widths


@dataclass
class SliceConfig:
    sparsity: float = 0.25
    # Kept widths are rounded down to a multiple of this, so matmuls stay kernel-friendly.
    round_to: int = 8
    cal_data: str = "wikitext2"
    cal_samples: int = 128
    cal_seqlen: int = 2048
    # One sequence per calibration batch: the per-layer temporaries of a 2048-token sequence
    # stay small enough for the allocator to reuse, where batches of 8 allocated and released
    # them (page faults) for every batch (bench/README.md). The sequences are the same.
    cal_batch_size: int = 1
    seed: int = 42
    # Keep a tied embedding/head pair tied (a small map after the final norm) rather than
    # untying it, which adds a vocabulary-sized matrix.
    tied_head: bool = True
    # The tied head reads the embedding basis: "joint" picks that basis for both the
    # embeddings and the head's input (from a survey pass); "input" for the embeddings alone.
    tied_head_basis: str = "joint"
    # Where rotations change: "block" (attention and MLP inputs each get their own,
    # two shortcuts per layer), "layer" (one per layer, one shortcut), "group:K" (K
    # consecutive layers share one), "model" (one for all: no shortcuts at all), or
    # "auto": the layout measured best at the size asked for (see layout.py).
    rotations: str = "auto"
    # A real parameter budget (every parameter counted) instead of a sparsity: the
    # widest width that fits is used. At most one of the two.
    target_params: int | None = None
    target_ratio: float | None = None
    # "uniform": one width everywhere; "variance": per-point widths that keep an equal
    # fraction of each point's variance, at the same real size as the uniform width;
    # "embedding": only the embeddings (and a tied head) are sliced, to the kept width, and
    # every layer keeps its width and its weights (for models whose vocabulary dominates);
    # "auto": embedding for families with post-norms where it keeps at least half the
    # embedding width, uniform otherwise (see layout.py).
    widths: str = "auto"
    # "raw": PCA of the stream as it is (the paper); "normalized": every token weighed
    # equally, as the RMS norms that read the stream see it; "auto": normalized for one
    # basis for the whole model, raw otherwise (what measured best for each; layout.py).
    pca: str = "auto"
    # Refit each layer's output projections by least squares after slicing, so the sliced
    # model follows the dense one on the calibration text (see refit.py). None (auto): on
    # with shared bases, where it costs a dense and a sliced pass over `refit_share` of the
    # sequences; off with per-block bases (a third pass) and embedding widths (no layer is
    # changed). Settled with the layout (layout.py).
    refit: bool | None = None
    # Shared bases (layer, group:K, model) from the covariances of this leading share of the
    # calibration sequences (at least one batch); per-block bases use them all.
    basis_share: float = 1.0
    # The refit's least squares read this leading share of the calibration sequences (at
    # least one batch): its passes and sums cost about 3.4 dense forwards over the share.
    # None (auto): a quarter from 0.8 x dense up, which keeps the default within 2 dense
    # forwards on protocol P (0.3 took 2.03; all of them gained another 2 perplexity points);
    # all of them below, where the cut is deep and the refit carries more (at 0.765 x: 48.61
    # against 52.08 for a quarter; bench/README.md). Settled with the layout (layout.py).
    refit_share: float | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        # The numbers follow the rules the CLI checks its flags by (a ValueError or TypeError here).
        check_number(self.sparsity, "sparsity")  # always set: None is only the CLI's "not given"
        check_slice_values(lambda field: getattr(self, field), lambda field: field.replace("_", "-"))
        if self.target_params is not None and self.target_ratio is not None:
            raise SliceGPTError("give target-params or target-ratio, not both")
        if self.widths not in WIDTHS:
            raise SliceGPTError(f"widths must be {', '.join(WIDTHS[:-1])} or {WIDTHS[-1]}, got {self.widths!r}")
        if self.widths == "embedding" and self.rotations not in ("auto", "block"):
            raise SliceGPTError(f"widths embedding keeps every layer in its own coordinates: rotations must be "
                                f"auto or block, got {self.rotations!r}")
        if self.widths == "embedding" and self.refit:
            raise SliceGPTError("widths embedding leaves every layer's weights as they are: there is nothing to "
                                "refit (drop --refit)")
        if self.tied_head_basis not in ("joint", "input"):
            raise SliceGPTError(f"tied-head-basis must be joint or input, got {self.tied_head_basis!r}")
        if self.pca not in ("auto", "raw", "normalized"):
            raise SliceGPTError(f"pca must be auto, raw or normalized, got {self.pca!r}")
        group = self.rotations.split(":", 1)
        valid = self.rotations in ("auto", "block", "layer", "model") or (
            group[0] == "group" and len(group) == 2 and group[1].isdigit() and int(group[1]) >= 1)
        if not valid:
            raise SliceGPTError(f"rotations must be auto, block, layer, model or group:K, got {self.rotations!r}")

    @property
    def group_size(self) -> int | None:
        """Layers per shared rotation, for the shared modes ("model" is one group of all)."""
        if self.rotations.startswith("group:"):
            return int(self.rotations.split(":", 1)[1])
        if self.rotations == "layer":
            return 1
        return None

    def kept_width(self, dense_width: int) -> int:
        """The residual width after slicing."""
        if self.sparsity == 0:
            return dense_width
        width = int((1.0 - self.sparsity) * dense_width)
        width -= width % self.round_to
        if width < 1:
            raise SliceGPTError(f"sparsity {self.sparsity} with round-to {self.round_to} leaves no width "
                                f"of the {dense_width} dimensions")
        return width

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The method as the paper describes it, for comparisons: a basis per block (two shortcuts
# per layer), PCA of the raw stream, one width everywhere, no refit, and a tied head untied
# (its own sliced matrix), as the original code does.
PAPER_METHOD = {"rotations": "block", "pca": "raw", "widths": "uniform", "refit": False, "tied_head": False}


def leading_count(total: int, share: float) -> int:
    """How many of `total` calibration batches a leading share (`basis_share`, `refit_share`)
    reads: at least one."""
    return max(1, round(total * share))
