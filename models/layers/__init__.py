"""Inference layers for Qwen3, written tensor-parallel-ready (each layer knows its rank's share)."""
