"""The benchmark suite (`make bench` = `python -m benchmarks.run`); not part of the tests."""
