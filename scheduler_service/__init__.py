"""CPU-side scheduler service: requests, Scheduler, BlockManager, tokenizer, stop checks.

Never imports torch (a test proves it). It decides which sequences run each step and where every
token's KV goes; workers only follow its step plans.
"""
