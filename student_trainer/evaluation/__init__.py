"""Evaluation, long context, generation, plots, lm-evaluation-harness."""
