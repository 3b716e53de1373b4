"""Benchmarks (``pfi bench ...``): each prints its figures and ratios against a baseline measured in
the same run, and writes ``bench/results/<name>.json``. Not part of the test suite."""
