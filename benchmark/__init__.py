"""Benchmarks and evaluation: ``python -m benchmark.run_experiment`` and ``eval_dolly.py``."""
