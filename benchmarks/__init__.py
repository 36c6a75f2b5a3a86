"""Benchmarks (numbers, not tests): run as ``python -m benchmarks.<name>`` from the repository root."""
