"""Benchmarks: each prints ratios against raw primitives measured in the same run."""
