"""transformers as the reference: greedy continuations from a loaded ``*ForCausalLM``.

One prompt at a time (no padding to perturb the numbers), exactly ``num_tokens`` new tokens with
no EOS. Used by the TP sweep's tie check and by the tests that compare nanoserve with transformers.
``hf_model`` loads a checkpoint for them and for bench.throughput's transformers engine.
"""

from __future__ import annotations

import torch


def hf_model(model_dir: str, dtype: torch.dtype = torch.bfloat16):
    """The checkpoint as a transformers ``*ForCausalLM`` in eval mode: on CUDA in ``dtype``, else
    on CPU in float32."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype if device == "cuda" else torch.float32
    )
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to


def hf_greedy(model, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Each prompt's ``num_tokens`` greedy tokens from ``model`` (on its own device)."""
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=model.device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs
