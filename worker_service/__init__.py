"""The worker: one process per GPU (one tensor-parallel rank). Executes step plans.

It owns the model shard, the KV cache memory, the attention backend and the sampler; it never
decides scheduling or block allocation (the scheduler's plan says where every token goes).
"""
