"""The trained tiny model's corpus: children's books, the repo's English, the Python standard library.

Three kinds of text, each split into trained-on and held-out documents the same way (every
HOLD_OUT_EVERY-th document is held out for perplexity and never trained on):

- stories: public-domain children's books (`models/corpus/children_books.txt.xz`, see
  `models/corpus/README.md`), books separated by a form feed, cut into passages of about
  STORY_PASSAGE_CHARS;
- english: `tiny_corpus.txt`, four paragraphs a document;
- python: this machine's standard-library sources (license: PSF), files in sorted path order.

The standard library differs between Python versions, so a training run that must not depend on
the machine reads a tokenized corpus instead: `TokenizedCorpus.save` writes the tokenizer and every
kind's token ids (uint16) into one `.npz`, `TokenizedCorpus.load` reads it back. Documents are
joined with `<|endoftext|>`.

This module reads and tokenizes text; it does not build, train or evaluate a model.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sys
import sysconfig
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from models.tiny import CORPUS_PATH, PAD_TOKEN, _token_id

HOLD_OUT_EVERY = 16  # document i is held out when i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3"})
MAX_FILE_BYTES = 400_000  # a few generated tables (unicode data, big docs) would swamp the rest
DOCUMENT_SEPARATOR = PAD_TOKEN
STORIES_PATH = Path(__file__).parent / "corpus" / "children_books.txt.xz"
BOOK_SEPARATOR = "\n\n\f\n\n"
STORY_PASSAGE_CHARS = 4_000
KINDS = ("stories", "english", "python")


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


def _passages(book: str) -> list[str]:
    """A book's paragraphs grouped into passages of at least STORY_PASSAGE_CHARS (the last may be short)."""
    passages, current = [], []
    for paragraph in book.split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= STORY_PASSAGE_CHARS:
            passages.append("\n\n".join(current) + "\n")
            current = []
    if current:
        passages.append("\n\n".join(current) + "\n")
    return passages


def stories_corpus(path: Path = STORIES_PATH) -> Corpus:
    """The children's books as passages, every book's passages in order, split the same way."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: the stories corpus (models/corpus/README.md says how)")
    books = lzma.decompress(path.read_bytes()).decode("utf-8").split(BOOK_SEPARATOR)
    return _split([passage for book in books for passage in _passages(book)])


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> list[int]:
    """All documents' token ids back to back, each followed by the separator token."""
    separator_id = _token_id(tokenizer, DOCUMENT_SEPARATOR)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
        ids += encoding.ids
        ids.append(separator_id)
    return ids


class TokenizedCorpus(NamedTuple):
    """A tokenizer and, per kind of text (KINDS), the train and held-out token ids ([N] uint16).

    `sources` says what the text was (Python version, the stories file's sha256), so a run on
    another machine can report it.
    """

    tokenizer: Tokenizer
    train_ids: dict[str, np.ndarray]
    held_out_ids: dict[str, np.ndarray]
    sources: dict[str, str]

    @classmethod
    def encode(
        cls, tokenizer: Tokenizer, corpora: dict[str, Corpus], stories: Path
    ) -> TokenizedCorpus:
        def ids(documents: list[str]) -> np.ndarray:
            return np.asarray(encode_documents(tokenizer, documents), dtype=np.uint16)

        assert tokenizer.get_vocab_size(with_added_tokens=True) <= 2**16
        sources = {
            "python": sys.version.split()[0],
            "stories_sha256": hashlib.sha256(stories.read_bytes()).hexdigest(),
        }
        return cls(
            tokenizer,
            {kind: ids(corpus.train) for kind, corpus in corpora.items()},
            {kind: ids(corpus.held_out) for kind, corpus in corpora.items()},
            sources,
        )

    def save(self, path: Path) -> None:
        """One compressed .npz: train_KIND, held_out_KIND, tokenizer and sources (UTF-8 bytes)."""
        arrays: dict[str, Any] = {f"train_{k}": v for k, v in self.train_ids.items()}
        arrays |= {f"held_out_{k}": v for k, v in self.held_out_ids.items()}
        arrays["tokenizer"] = _utf8_array(self.tokenizer.to_str())
        arrays["sources"] = _utf8_array(json.dumps(self.sources, sort_keys=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> TokenizedCorpus:
        with np.load(path) as data:
            tokenizer = Tokenizer.from_str(data["tokenizer"].tobytes().decode("utf-8"))
            sources = json.loads(data["sources"].tobytes().decode("utf-8"))
            train = {k: data[f"train_{k}"] for k in KINDS if f"train_{k}" in data}
            held_out = {k: data[f"held_out_{k}"] for k in KINDS if f"held_out_{k}" in data}
        return cls(tokenizer, train, held_out, sources)


def _utf8_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
