"""Train the tiny default model: a few-million-parameter Qwen3 on children's books and Python.

    python -m models.train_tiny --write-tokens out/tiny_tokens.npz   # tokenize (CPU, a minute)
    python -m models.train_tiny --tokens out/tiny_tokens.npz --out models/tiny_trained

Trains transformers' Qwen3ForCausalLM (the architecture our engine runs, same config.json) from a
fixed seed for a fixed token budget (num_steps x batch_size x SEQ_LEN) on `models.tiny_data`'s
corpus, with a tokenizer trained the way `models.tiny` trains its own. ENGLISH_FRACTION of every
batch's rows come from the English (stories and tiny_corpus.txt), the rest from Python sources.
Without --tokens the corpus is read and tokenized in the same run; with it, the run depends only
on that file (not on the machine's standard library), so it can be tokenized here and trained on
a GPU elsewhere. It writes a Hugging Face style directory (float32 safetensors, config,
tokenizer) plus `training.json` and README.md: the command, seed, loss curve and held-out
perplexity of the trained and of the untrained (random) model.

On one GPU (bf16 autocast, float32 weights) the default budget takes a few minutes; on CPU use
--steps and --batch-size for a smoke run. This module is not imported by the servers.
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

import numpy as np

from models import tiny, tiny_data
from models.tiny_card import write_model_card

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
BATCH_SIZE = 64
NUM_STEPS = 1500
PEAK_LR = 3e-3
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
ENGLISH_FRACTION = 0.75
TOKENIZER_PYTHON_CHARS = 3_000_000
EVAL_NUM_WINDOWS = 64
NUM_CURVE_POINTS = 10
METRICS_NAME = "training.json"


def build_tokenizer(corpora: dict[str, tiny_data.Corpus]) -> Tokenizer:
    """The byte-level BPE of models.tiny, trained on all the English and the start of the sources."""
    texts = corpora["stories"].train + corpora["english"].train
    num_chars = 0
    for document in corpora["python"].train:
        if num_chars >= TOKENIZER_PYTHON_CHARS:
            break
        texts.append(document)
        num_chars += len(document)
    return tiny.bpe_tokenizer(texts, VOCAB_SIZE)


def tokenize_corpus(stories: Path) -> tiny_data.TokenizedCorpus:
    """Read every kind of text, train the tokenizer on it and encode it."""
    corpora = {
        "stories": tiny_data.stories_corpus(stories),
        "english": tiny_data.english_corpus(),
        "python": tiny_data.python_corpus(),
    }
    return tiny_data.TokenizedCorpus.encode(build_tokenizer(corpora), corpora, stories)


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


def learning_rate(step: int, num_steps: int) -> float:
    """Linear warm-up to PEAK_LR, then cosine decay to a tenth of it."""
    warmup = min(WARMUP_STEPS, max(1, num_steps // 10))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, num_steps - warmup)
    return PEAK_LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def training_streams(data: tiny_data.TokenizedCorpus) -> tuple[np.ndarray, np.ndarray]:
    """The English (stories then tiny_corpus) and the Python train ids, each [N] int64."""
    english = np.concatenate([data.train_ids["stories"], data.train_ids["english"]])
    return english.astype(np.int64), data.train_ids["python"].astype(np.int64)


def sample_batch(
    streams: list[torch.Tensor], num_rows: list[int], generator: torch.Generator
) -> torch.Tensor:
    """num_rows[i] random SEQ_LEN windows of streams[i] ([N_i], on the model's device): [B, S]."""
    import torch

    rows = []
    for ids, n in zip(streams, num_rows):
        starts = torch.randint(0, len(ids) - SEQ_LEN, (n, 1), generator=generator)
        rows.append(ids[(starts + torch.arange(SEQ_LEN)).to(ids.device)])  # [n, S]
    return torch.cat(rows)


def train(
    model: Qwen3ForCausalLM,
    streams: list[torch.Tensor],
    num_steps: int,
    batch_size: int,
    seed: int = SEED,
) -> list[tuple[int, float]]:
    """AdamW steps on batches mixing the streams; the loss curve as (step, mean loss) points."""
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    num_english = round(batch_size * ENGLISH_FRACTION)
    num_rows = [num_english, batch_size - num_english]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY
    )
    use_bf16 = model.device.type == "cuda"
    every = max(1, num_steps // NUM_CURVE_POINTS)
    curve, window = [], []
    model.train()
    bar = tqdm(range(num_steps), desc="train", unit="step", mininterval=2.0)
    for step in bar:
        batch = sample_batch(streams, num_rows, generator)  # [B, S]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, num_steps)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if step % 25 == 0:  # .item() waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{learning_rate(step, num_steps):.1e}")
        if (step + 1) % every == 0 or step + 1 == num_steps:
            curve.append((step + 1, round(torch.stack(window).mean().item(), 4)))
            window = []
    model.eval()
    return curve


def perplexity(model: Qwen3ForCausalLM, token_ids: Any, num_windows: int, seq_len: int) -> float:
    """exp(mean next-token loss) over the first num_windows consecutive seq_len windows."""
    import torch

    usable = min(num_windows, len(token_ids) // seq_len) * seq_len
    ids = np.asarray(token_ids[:usable], dtype=np.int64)
    windows = torch.from_numpy(ids).view(-1, seq_len).to(model.device)  # [W, S]
    with torch.no_grad():
        losses = [model(input_ids=w, labels=w).loss.item() for w in windows.split(16)]
    sizes = [len(w) for w in windows.split(16)]
    return math.exp(sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes))


def evaluate(model: Qwen3ForCausalLM, held_out: dict[str, np.ndarray]) -> dict[str, float]:
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory to write the model into")
    parser.add_argument("--tokens", type=Path, help="train on this --write-tokens file")
    parser.add_argument("--write-tokens", type=Path, help="write the tokenized corpus here")
    parser.add_argument("--stories", type=Path, default=tiny_data.STORIES_PATH)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=NUM_STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args(argv)
    if args.out is None and args.write_tokens is None:
        parser.error("nothing to do: give --out, --write-tokens or both")
    return args


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    started = time.monotonic()
    data = (
        tiny_data.TokenizedCorpus.load(args.tokens)
        if args.tokens
        else tokenize_corpus(args.stories)
    )
    sizes = {kind: len(ids) for kind, ids in data.train_ids.items()}
    print(f"train tokens {sizes}, held-out { ({k: len(v) for k, v in data.held_out_ids.items()}) }")
    if args.write_tokens:
        data.save(args.write_tokens)
        print(f"wrote {args.write_tokens} ({args.write_tokens.stat().st_size:,} bytes)")
    if args.out is None:
        return
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    config = model_config(data.tokenizer)
    model: Any = build_model(config)
    model = model.to(device)
    random_ppl = evaluate(model, data.held_out_ids)
    streams = [torch.from_numpy(ids).to(device) for ids in training_streams(data)]
    train_started = time.monotonic()
    curve = train(model, streams, args.steps, args.batch_size)
    train_seconds = time.monotonic() - train_started
    trained_ppl = evaluate(model, data.held_out_ids)
    save(model, data.tokenizer, config, args.out)
    num_tokens = args.steps * args.batch_size * SEQ_LEN
    metrics = {
        "command": "python -m models.train_tiny "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": SEED,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": data.sources["python"],
        "stories_sha256": data.sources["stories_sha256"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "english_fraction": ENGLISH_FRACTION,
        "num_train_tokens_seen": num_tokens,
        "num_corpus_tokens": sizes,
        "loss_curve": curve,
        "final_loss": curve[-1][1],
        "held_out_perplexity": {"trained": trained_ppl, "random": random_ppl},
        "train_tokens_per_second": round(num_tokens / train_seconds),
        "train_seconds": round(time.monotonic() - started),
    }
    tiny._write_json(args.out / METRICS_NAME, metrics)
    write_model_card(args.out, metrics)
    print("loss curve:", "  ".join(f"{step}:{loss:.3f}" for step, loss in curve))
    print(json.dumps(metrics["held_out_perplexity"], indent=2))
    print(f"{metrics['train_tokens_per_second']:,} tokens/s, {metrics['train_seconds']} s in all")


if __name__ == "__main__":
    main()
