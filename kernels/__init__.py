"""Attention kernels: one kernel per file, each beside its torch reference (``*_ref``).

The references run anywhere (CPU included) and are the ground truth the Triton kernels are tested
against. Nothing here knows about sequences, schedulers or gRPC: only tensors.
"""
