"""Benchmarks. Each reports its figures as ratios against raw primitives measured in the same run."""
