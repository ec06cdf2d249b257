"""Benchmarks, each a module run from the repository root: ``python -m bench.<name>``."""
