"""Benchmarks: throughput against the hardware bound, control-plane costs, kernels."""
