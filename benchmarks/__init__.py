"""Benchmarks of the qkv course: ``python -m benchmarks [--quick] [--only NAME,...]``.

Scripts, not tests: they print ratios measured side by side in one run and write the rows,
with the machine they ran on, to benchmarks/results/bench-<date>.json. This package imports
neither NumPy nor PyTorch, so a benchmark can fix thread counts before they load.
"""
