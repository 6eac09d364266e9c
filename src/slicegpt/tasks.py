"""The zero-shot tasks as the paper scores them (no lm-eval import, so any layer may read this)."""

from __future__ import annotations

# The paper averages length-normalised accuracy, except where lm-eval reports only plain
# accuracy (WinoGrande, LAMBADA).
PLAIN_ACC_TASKS = {"winogrande", "lambada_openai"}


def paper_metric(task: str) -> str:
    return "acc" if task in PLAIN_ACC_TASKS else "acc_norm"
