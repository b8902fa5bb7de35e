"""Speed and memory benchmarks (not run in CI): see benchmarks/harness.py and README."""
