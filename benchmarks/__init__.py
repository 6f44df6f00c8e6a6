"""Benchmark suite of mvllm: a load generator, a process harness and scenarios (`python -m benchmarks.run`)."""
