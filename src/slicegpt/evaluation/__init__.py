"""Evaluation beyond perplexity: zero-shot tasks through lm-evaluation-harness."""

from slicegpt.evaluation.zeroshot import available_tasks, evaluate_zeroshot, parse_tasks

__all__ = ["available_tasks", "evaluate_zeroshot", "parse_tasks"]
