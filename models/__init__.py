"""Model definitions (Qwen3), their tensor-parallel layers, and checkpoint loading.

Importing this package imports nothing heavy: ``models.config`` is torch-free so the CPU-only
scheduler can read a checkpoint's config; the torch modules live in ``models.qwen3``,
``models.layers`` and ``models.loader``. Nothing here knows about gRPC.
"""
