"""The trained tiny model's card: README.md beside its weights, from the run's metrics.

Written by models/train_tiny.py at the end of a run; kept apart so the training script stays about
training.
"""

from __future__ import annotations

from pathlib import Path


def write_model_card(out: Path, metrics: dict) -> None:
    """README.md beside the weights: what this model is, how it was made, how well it does."""
    ppl = metrics["held_out_perplexity"]
    rows = [f"| {k} | {ppl['trained'][k]} | {ppl['random'][k]} |" for k in ppl["trained"]]
    curve = ", ".join(f"{step}: {loss}" for step, loss in metrics["loss_curve"])
    lines = [
        "# tiny_trained: the default model",
        "",
        f"A {metrics['num_parameters']:,}-parameter Qwen3 (float32) trained on public-domain",
        "children's books (`models/corpus/`), `models/tiny_corpus.txt` and the Python",
        f"{metrics['python']} standard library's sources, so that `make run` shows real completions.",
        "Written by `models/train_tiny.py`; do not edit by hand.",
        "",
        f"- command: `{metrics['command']}`",
        f"- seed: {metrics['seed']}, device: {metrics['device']}, torch {metrics['torch']}",
        f"- tokens seen: {metrics['num_train_tokens_seen']:,} ({metrics['num_steps']} steps of "
        f"{metrics['batch_size']} x {metrics['seq_len']}, {metrics['english_fraction']:.0%} English)",
        f"- corpus tokens: {metrics['num_corpus_tokens']}",
        f"- loss by step: {curve}",
        f"- wall time: {metrics['train_seconds']} s",
        "",
        "Held-out perplexity (book passages, English paragraphs and standard-library files never",
        "trained on; the random model is the same config at its initialisation):",
        "",
        "| text | trained | random |",
        "|---|---|---|",
        *rows,
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
