"""Benchmarks: single-stream decode/prefill side by side (decode.py), linear kernels (kernels.py)."""
