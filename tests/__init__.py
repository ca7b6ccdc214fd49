"""The test suite, a package so that ``tests.support`` imports the same way from pytest and from
``python -m bench.X`` run at the repository root (robustbench installs a top-level ``tests`` package too)."""
