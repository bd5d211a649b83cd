"""The trained tiny model's corpus: this machine's Python standard library plus the repo's English.

Every machine with Python has the standard library's sources (license: PSF), so the corpus needs
no download. Files are taken in sorted path order; every HOLD_OUT_EVERY-th one is held out for
perplexity and never trained on. The English is `tiny_corpus.txt`, split by paragraph the same
way. Documents are joined with `<|endoftext|>`.

This module reads and tokenizes text; it does not build, train or evaluate a model.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer

from models.tiny import CORPUS_PATH, PAD_TOKEN, _token_id

HOLD_OUT_EVERY = 16  # file i is held out when i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3"})
MAX_FILE_BYTES = 400_000  # a few generated tables (unicode data, big docs) would swamp the rest
DOCUMENT_SEPARATOR = PAD_TOKEN


class Corpus(NamedTuple):
    """Documents to train on and documents held out, each a list of strings."""

    train: list[str]
    held_out: list[str]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py sources in sorted order, without tests and third-party code."""
    root = stdlib_root() if root is None else root
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIPPED_DIRS or p.startswith("test") for p in parts[:-1]):
            continue
        if parts[-1].startswith("test_") or path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(path)
    return files


def _split(documents: list[str]) -> Corpus:
    held = [d for i, d in enumerate(documents) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    train = [d for i, d in enumerate(documents) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    return Corpus(train, held)


def python_corpus(root: Path | None = None) -> Corpus:
    """The standard library's sources, split into trained-on and held-out files."""
    return _split([p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(root)])


def english_corpus() -> Corpus:
    """tiny_corpus.txt's paragraphs, split the same way (consecutive paragraphs make a document)."""
    paragraphs = [p for p in CORPUS_PATH.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    documents = ["\n\n".join(paragraphs[i : i + 4]) + "\n" for i in range(0, len(paragraphs), 4)]
    return _split(documents)


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> list[int]:
    """All documents' token ids back to back, each followed by the separator token."""
    separator_id = _token_id(tokenizer, DOCUMENT_SEPARATOR)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
        ids += encoding.ids
        ids.append(separator_id)
    return ids
