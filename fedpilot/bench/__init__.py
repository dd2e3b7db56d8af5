"""Benchmarks printing one JSON object per line, each with a ``bench`` key."""
