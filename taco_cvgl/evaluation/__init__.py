"""Scoring against ground truth: Recall@k, fix precision, coverage, reports and plots."""
