"""Distillation from the dense model: forward KL(teacher ‖ student) over the whole vocabulary.

The loss at each position is `sum_v p_t(v) (log p_t(v) - log p_s(v))` at temperature 1,
averaged over every position of the batch, optionally mixed with the next-token loss.
Forward KL at T = 1 is what structured-pruning recovery found best among the losses tried
(Minitron); its gradient with respect to the student's logits is `p_s - p_t`, so a student
equal to its teacher has loss and gradient zero.

Memory stays flat in the vocabulary: both models run their body once, and the head is
applied to chunks of positions in turn. Each chunk's logits (student and teacher, in
float32) live only while its KL is summed; under autograd a chunk is checkpointed, so the
backward pass recomputes its logits instead of keeping batch x length x vocab of them.

TRL's GKDTrainer computes the same loss at beta = 0, but it is not used here: it lives in
`trl.experimental`, is built on the SFT trainer and its chat-message collator (prompts and
completions, loss on completions), holds both models' full logits at once, and brings its
own Trainer checkpoints and progress reporting (plus accelerate, datasets and pandas).
Plain-text recovery needs none of that, and the loop in recovery/finetune.py already has
the checkpoints that resume to the same weights; the loss is this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slicegpt.errors import SliceGPTError

IGNORE = -100


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The body's output (after the final norm): what the head reads."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final hidden states, with the scalars some families put after the head.

    Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma 2 and 3
    soft-cap with `final_logit_softcapping`; the others apply the head alone.
    """
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "logit_scale", None) is not None and hasattr(model, "logit_scale"):
        logits = logits * model.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def next_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """The label of each position: the token after it (none after the last)."""
    ignore = torch.full_like(input_ids[:, :1], IGNORE)
    return torch.cat([input_ids[:, 1:], ignore], dim=1)


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (half-precision log-softmax over the vocabulary loses the tail)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_sums(student: nn.Module, teacher: nn.Module, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """(sum of KL, sum of next-token loss) over one chunk of positions."""
    student_log = F.log_softmax(_wide(head_logits(student, student_hidden)), dim=-1)
    with torch.no_grad():
        teacher_log = F.log_softmax(_wide(head_logits(teacher, teacher_hidden)), dim=-1)
    kl = F.kl_div(student_log.flatten(0, 1), teacher_log.flatten(0, 1), log_target=True, reduction="sum")
    nll = F.nll_loss(student_log.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return torch.stack([kl, nll])


def distill_terms(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                  chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(teacher ‖ student) per position, next-token loss per predicted token) on `input_ids`.

    The teacher runs without gradients; `chunk` positions of every sequence get their logits
    at a time. Differentiable with respect to the student when grad is enabled.
    """
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, input_ids)
    student_hidden = final_hidden(student, input_ids)
    labels = next_tokens(input_ids)
    sums = torch.zeros(2, dtype=torch.promote_types(student_hidden.dtype, torch.float32), device=student_hidden.device)
    for start in range(0, input_ids.shape[1], chunk):
        piece = slice(start, start + chunk)
        args = (student, teacher, student_hidden[:, piece], teacher_hidden[:, piece], labels[:, piece])
        if torch.is_grad_enabled():
            sums = sums + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            sums = sums + _chunk_sums(*args)
    positions = input_ids.numel()
    predicted = max(1, positions - input_ids.shape[0])
    return sums[0] / positions, sums[1] / predicted


def distill_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, lm_weight: float = 0.0,
                 chunk: int = 128) -> tuple[torch.Tensor, dict]:
    """(1 - lm_weight) KL + lm_weight * next-token loss, and both terms as floats."""
    kl, nll = distill_terms(student, teacher, input_ids, chunk)
    loss = kl if lm_weight == 0 else (1 - lm_weight) * kl + lm_weight * nll
    return loss, {"kl": kl.item(), "lm": nll.item()}


def kl_unchunked(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The same KL from the models' own full logits (the reference the chunked form must equal)."""
    with torch.no_grad():
        teacher_log = F.log_softmax(_wide(teacher(input_ids=input_ids, use_cache=False).logits), dim=-1)
    student_log = F.log_softmax(_wide(student(input_ids=input_ids, use_cache=False).logits), dim=-1)
    return F.kl_div(student_log.flatten(0, 1), teacher_log.flatten(0, 1), log_target=True,
                    reduction="sum") / input_ids.numel()


# The special tokens whose ids must agree: they start and end the text the teacher writes
# and stand for what neither tokenizer knows. (Padding never reaches the loss.)
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "unk_token_id")


def tokenizer_difference(student, teacher) -> str | None:
    """How two tokenizers differ, in words, or None: special ids, size, then the token-to-id mapping.

    The KL compares the two models token id by token id, so equal vocabulary sizes are not
    enough: the same id must be the same text. The whole mapping is compared, one dictionary
    against another: cheap beside loading either model.
    """
    for name in SPECIAL_IDS:
        mine, theirs = getattr(student, name, None), getattr(teacher, name, None)
        if mine != theirs:
            return f"{name} is {theirs} in the teacher's, {mine} in the student's"
    if len(student) != len(teacher):
        return f"the teacher's has {len(teacher)} tokens, the student's {len(student)}"
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    for token, index in sorted(mine.items(), key=lambda item: item[1]):  # the lowest id that differs
        if theirs.get(token) != index:
            return f"token {token!r} is id {theirs.get(token)} in the teacher's, {index} in the student's"
    return None


def check_same_tokenizer(student, teacher, name: str) -> None:
    """Refuse a teacher whose tokenizer is not the student's."""
    difference = tokenizer_difference(student, teacher)
    if difference is not None:
        raise SliceGPTError(f"the tokenizer of {name} is not the student's ({difference}); distil from the model "
                            "the slice was made from, or one with its tokenizer")
