"""Train the tiny default model: a few-million-parameter Qwen3 on Python sources and English.

    python -m models.train_tiny --out models/tiny_trained

Trains transformers' Qwen3ForCausalLM (the architecture our engine runs, same config.json) from a
fixed seed for a fixed token budget (NUM_STEPS x BATCH_SIZE x SEQ_LEN) on `models.tiny_data`'s
corpus, with a tokenizer trained the way `models.tiny` trains its own. It writes a Hugging Face
style directory (float32 safetensors, config, tokenizer) plus `training.json`: the command, seed,
final loss and held-out perplexity of the trained and of the untrained (random) model.

On an idle 2-core CPU this takes about 15 minutes; a GPU is used when there is one (results
then differ in the last bits). This module is not imported by the servers; they only load the files.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import tiny, tiny_data

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3ForCausalLM

SEED = 0
VOCAB_SIZE = 4096
ARCHITECTURE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 640,
    "max_window_layers": 4,
}
SEQ_LEN = 256
BATCH_SIZE = 16
NUM_STEPS = 700
PEAK_LR = 3e-3
WARMUP_STEPS = 30
WEIGHT_DECAY = 0.1
ENGLISH_REPEATS = 24  # the English is small next to the standard library; show it more often
TOKENIZER_TEXT_CHARS = 6_000_000
EVAL_NUM_WINDOWS = 64
METRICS_NAME = "training.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def build_tokenizer(corpus: tiny_data.Corpus, english: tiny_data.Corpus) -> Tokenizer:
    """The byte-level BPE of models.tiny, trained on the English and the start of the sources."""
    texts, num_chars = list(english.train), 0
    for document in corpus.train:
        if num_chars >= TOKENIZER_TEXT_CHARS:
            break
        texts.append(document)
        num_chars += len(document)
    return tiny.bpe_tokenizer(texts, VOCAB_SIZE)


def model_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """models.tiny's Qwen3 config.json, at this model's size."""
    vocab_size = tiny.padded_vocab_size(tokenizer.get_vocab_size(with_added_tokens=True))
    eos_id = tiny._token_id(tokenizer, tiny.EOS_TOKEN)
    bos_id = tiny._token_id(tokenizer, tiny.PAD_TOKEN)
    return tiny.model_config(vocab_size, eos_id, bos_id) | ARCHITECTURE


def build_model(config: dict[str, Any], seed: int = SEED) -> Qwen3ForCausalLM:
    """An untrained Qwen3ForCausalLM, initialised from seed, in float32."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    hf_config = Qwen3Config(**{k: v for k, v in config.items() if k != "architectures"})
    model: Any = Qwen3ForCausalLM(hf_config)  # Any: mypy misreads transformers' .to wrapper
    return model.to(torch.float32)


def learning_rate(step: int) -> float:
    """Linear warm-up to PEAK_LR, then cosine decay to a tenth of it."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, NUM_STEPS - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model: Qwen3ForCausalLM, token_ids: torch.Tensor, seed: int = SEED) -> float:
    """NUM_STEPS AdamW steps on random SEQ_LEN windows of token_ids ([N]); the last steps' mean loss."""
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY
    )
    model.train()
    recent: list[float] = []
    bar = tqdm(range(NUM_STEPS), desc="train", unit="step")
    for step in bar:
        starts = torch.randint(0, len(token_ids) - SEQ_LEN, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([token_ids[s : s + SEQ_LEN] for s in starts.tolist()])  # [B, S]
        batch = batch.to(model.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{learning_rate(step):.1e}")
    model.eval()
    return sum(recent) / len(recent)


def perplexity(
    model: Qwen3ForCausalLM, token_ids: list[int], num_windows: int, seq_len: int
) -> float:
    """exp(mean next-token loss) over the first num_windows consecutive seq_len windows."""
    import torch

    usable = min(num_windows, len(token_ids) // seq_len) * seq_len
    windows = torch.tensor(token_ids[:usable]).view(-1, seq_len).to(model.device)  # [W, S]
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def held_out_ids(
    tokenizer: Tokenizer, corpus: tiny_data.Corpus, english: tiny_data.Corpus
) -> dict[str, list[int]]:
    return {
        "python": tiny_data.encode_documents(tokenizer, corpus.held_out),
        "english": tiny_data.encode_documents(tokenizer, english.held_out),
    }


def evaluate(model: Qwen3ForCausalLM, held_out: dict[str, list[int]]) -> dict[str, float]:
    """Held-out perplexity per kind of text, rounded for the record."""
    return {
        kind: round(perplexity(model, ids, EVAL_NUM_WINDOWS, SEQ_LEN), 2)
        for kind, ids in held_out.items()
    }


def save(
    model: Qwen3ForCausalLM, tokenizer: Tokenizer, config: dict[str, object], out: Path
) -> None:
    """The files the engine and transformers load; weights without the tied lm_head copy."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    tiny._write_json(out / "tokenizer_config.json", tiny.tokenizer_config(tokenizer))
    tiny._write_json(out / "config.json", config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    tiny._write_json(out / "generation_config.json", generation)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"), {"format": "pt"})


def write_model_card(out: Path, metrics: dict) -> None:
    """README.md beside the weights: what this model is, how it was made, how well it does."""
    ppl = metrics["held_out_perplexity"]
    rows = [f"| {k} | {ppl['trained'][k]} | {ppl['random'][k]} |" for k in sorted(ppl["trained"])]
    lines = [
        "# tiny_trained: the default model",
        "",
        f"A {metrics['num_parameters']:,}-parameter Qwen3 (float32) trained on this machine's",
        f"Python {metrics['python']} standard library sources and `models/tiny_corpus.txt`, so that",
        "`make run` shows real completions. Written by `models/train_tiny.py`; do not edit by hand.",
        "",
        f"- command: `{metrics['command']}` (or `make train-tiny`)",
        f"- seed: {metrics['seed']}, device: {metrics['device']}",
        f"- tokens seen: {metrics['num_train_tokens_seen']:,} "
        f"(corpus: {metrics['num_corpus_tokens']:,} tokens)",
        f"- final training loss: {metrics['final_loss']}",
        f"- wall time: {metrics['train_seconds']} s",
        "",
        "Held-out perplexity (standard-library files and English paragraphs never trained on; "
        "the random model is the same config at its initialisation):",
        "",
        "| text | trained | random |",
        "|---|---|---|",
        *rows,
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    started = time.monotonic()
    corpus, english = tiny_data.python_corpus(), tiny_data.english_corpus()
    tokenizer = build_tokenizer(corpus, english)
    config = model_config(tokenizer)
    train_ids = tiny_data.encode_documents(
        tokenizer, corpus.train + english.train * ENGLISH_REPEATS
    )
    held_out = held_out_ids(tokenizer, corpus, english)
    print(
        f"{len(corpus.train)} train / {len(corpus.held_out)} held-out files, {len(train_ids):,} tokens"
    )
    model: Any = build_model(config)
    model = model.to(device)
    random_ppl = evaluate(model, held_out)
    final_loss = train(model, torch.tensor(train_ids))
    trained_ppl = evaluate(model, held_out)
    save(model, tokenizer, config, args.out)
    metrics = {
        "command": "python -m models.train_tiny "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": SEED,
        "device": device,
        "python": sys.version.split()[0],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_train_tokens_seen": NUM_STEPS * BATCH_SIZE * SEQ_LEN,
        "num_corpus_tokens": len(train_ids),
        "final_loss": round(final_loss, 4),
        "held_out_perplexity": {"trained": trained_ppl, "random": random_ppl},
        "train_seconds": round(time.monotonic() - started),
    }
    tiny._write_json(args.out / METRICS_NAME, metrics)
    write_model_card(args.out, metrics)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
