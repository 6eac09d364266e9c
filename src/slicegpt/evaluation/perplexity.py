"""WikiText-style perplexity: non-overlapping chunks of one token stream."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from slicegpt.io.data import tokenize_joined
from slicegpt.errors import SliceGPTError
from slicegpt.checks import check_ppl_values


LOSS_POSITIONS = 512  # positions per cross-entropy call: a 262k vocabulary's copies stay small


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token loss, a slice of positions at a time (each slice's float copy and
    log-softmax are a fraction of the logits' size)."""
    total = 0.0
    for start in range(0, logits.shape[1], LOSS_POSITIONS):
        piece = logits[:, start:start + LOSS_POSITIONS]
        total += F.cross_entropy(piece.flatten(0, 1).float(), targets[:, start:start + LOSS_POSITIONS].flatten(),
                                 reduction="sum").item()
    return total


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], seqlen: int = 2048, chunks: int | None = None,
               batch_size: int = 1, progress: bool = True) -> dict:
    """exp(mean next-token loss) over the first `chunks` windows of `seqlen` tokens."""
    check_ppl_values(chunks, seqlen, batch_size)  # the rules `slicegpt ppl` checks its flags by
    stream = tokenize_joined(tokenizer, texts)
    available = len(stream) // seqlen
    count = available if chunks is None else min(chunks, available)
    if count == 0:
        raise SliceGPTError(f"perplexity data has {len(stream)} tokens, fewer than one chunk of {seqlen}")
    windows = stream[: count * seqlen].view(count, seqlen)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="Perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total_loss += _summed_loss(logits[:, :-1], batch[:, 1:])
        total_tokens += batch[:, 1:].numel()
    ppl = math.exp(total_loss / total_tokens)
    if not math.isfinite(ppl):
        raise SliceGPTError("perplexity is not finite: the model produced NaN or inf logits")
    return {"ppl": ppl, "tokens": total_tokens, "chunks": count, "seqlen": seqlen}
