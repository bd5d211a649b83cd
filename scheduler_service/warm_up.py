"""Warm-up: requests a fresh session runs before it serves, so that no user request pays a compile.

Triton compiles a kernel the first time it meets a new specialization (an integer argument that
is 1, a multiple of 16 or neither; a pointer's alignment), and CUDA loads a library kernel the
first time a shape needs it. The worker captures the decode CUDA graphs when it starts (every
batch bucket, the sampling kernel included) and runs one plain prefill of the token budget; not
the steps below, which without a warm-up compile inside the first users' requests (on an H200 with
an empty compile cache, the first pass of nano_bench_256 ran at 0.84 of the second). So a session
first runs, to the end, on pseudo-random prompts no user sends:

1. prompts of 1, 2, 15, 16, 17, 31 and 100 tokens and a block less one, all at once, each
   generating 8 tokens with greedy, seeded, top-k, top-p, min-p, min_tokens and logprobs rows:
   batches whose block tables are one block wide;
2. those, a block, a block plus one and one prompt longer than the token budget (chunked
   prefill: its later chunks attend over its own cached blocks), all at once: plain prefill
   batches, mixed steps (decodes beside a chunk), decode batches;
3. the second wave's prompts with a new last token (prefix-cache hits: paged prefill over cached
   blocks).

Its requests detokenize, as users' do: the tokenizer builds its byte-level decode table on its
first detokenization, which took 7 ms for the embedded model's 4,096 tokens on a 2-core x86
CPU and grows with the vocabulary; left to the first user request, it was 8 of that
request's 39 ms to first token there. Lengths are capped
by max_model_len and the token budget. Warm-up tokens are not counted in the
server's statistics (engine_loop.py); the blocks they leave in the prefix cache are free blocks.
"""

from __future__ import annotations

import random
from dataclasses import replace

from protos.sampling_params import SamplingParams
from scheduler_service.engine import EngineCore

MAX_TOKENS = 8
SEED = 20261201
SAMPLING = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.8, top_k=20, seed=2),
    SamplingParams(temperature=0.7, top_p=0.9, seed=3),
    SamplingParams(temperature=1.0, min_p=0.05, seed=4),
    SamplingParams(temperature=1.0, min_tokens=4, seed=5),
    SamplingParams(temperature=0.0, logprobs=2),
)


def warm_up_prompts(engine: EngineCore) -> list[list[int]]:
    """The first wave's prompts, within the engine's limits."""
    block = engine.info.block_size
    budget = engine.config.max_num_batched_tokens
    longest = engine.max_model_len - MAX_TOKENS - 1
    lengths = [1, 2, 15, 16, 17, 31, 100, block - 1, block, block + 1, budget + block + 3]
    rng = random.Random(SEED)
    vocab = engine.info.vocab_size
    lengths = sorted({n for n in (min(n, longest) for n in lengths) if n >= 1})
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def warm_up(engine: EngineCore) -> None:
    """Run the three waves to the end (blocking; the engine thread, before the session serves)."""
    prompts = warm_up_prompts(engine)
    vocab = engine.info.vocab_size
    short = [p for p in prompts if len(p) < engine.info.block_size]
    again = [p + [(p[-1] + 1) % vocab] for p in prompts if len(p) + 1 < engine.max_model_len]
    for wave, batch in enumerate((short, prompts, again)):
        for i, prompt in enumerate(batch):
            base = SAMPLING[i % len(SAMPLING)]
            max_tokens = min(MAX_TOKENS, engine.max_model_len - len(prompt))
            min_tokens = min(base.min_tokens, max_tokens)
            params = replace(base, max_tokens=max_tokens, min_tokens=min_tokens)
            engine.add_request(f"warm-up-{wave}-{i}", prompt, params)
        while engine.has_unfinished:
            engine.step()
