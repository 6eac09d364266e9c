"""Perplexity's loss, summed a slice of positions at a time, equals one cross-entropy over all."""

import torch
from torch.nn import functional as F

from slicegpt.evaluation.perplexity import LOSS_POSITIONS, _summed_loss


def test_sliced_loss_equals_one_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    positions = 2 * LOSS_POSITIONS + 77  # two full slices and a partial one
    logits = torch.randn(2, positions, 50, generator=generator)
    targets = torch.randint(0, 50, (2, positions), generator=generator)
    expected = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="sum").item()
    assert abs(_summed_loss(logits, targets) - expected) <= 1e-6 * expected  # float32 rounding
