"""Benchmarks of skillgate (``python -m bench.overhead``: the gateway's overhead over the stub)."""
