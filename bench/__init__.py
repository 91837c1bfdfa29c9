"""Atlas benchmarks: ``python -m bench [--quick]``. See docs/benchmarks.md."""
