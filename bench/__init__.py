"""Benchmarks, run from the repository root as ``python -m bench.<script>`` (see bench/README.md)."""
