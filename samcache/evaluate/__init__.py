"""Scoring from the cache: zero-shot vs fine-tuned vs the filled box, clicks, segment everything; the
report.
"""
