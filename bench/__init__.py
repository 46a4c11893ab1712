"""Benchmarks (`make bench`) and the accuracy harness (`make eval`); not part of the package."""
