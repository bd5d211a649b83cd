"""The tokenizer files of a model directory as one zip archive, for vLLM's GetTokenizer RPC.

The gateway builds its tokenizer from this archive when it cannot read the model directory (a
replica on another machine): the files ``transformers`` and ``tokenizers`` load a tokenizer and
its chat template from, whichever the directory has. The archive is streamed in chunks, the last
one carrying the SHA-256 of the whole archive (smg.grpc.common.GetTokenizerChunk).
Not here: the gRPC method (vllm_engine.py).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
CHUNK_BYTES = 1 << 20


def tokenizer_zip(model_dir: Path) -> bytes:
    """The archive of ``model_dir``'s tokenizer files (flat, by name); ValueError if it has no
    tokenizer.json or tokenizer_config.json."""
    names = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not {"tokenizer.json", "tokenizer_config.json"} & set(names):
        raise ValueError(f"model directory {model_dir} holds no tokenizer files")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.write(model_dir / name, arcname=name)
    return buffer.getvalue()


def chunks(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[bytes, str]]:
    """(piece, sha256): consecutive pieces of ``data``; sha256 (hex) on the last one only."""
    digest = hashlib.sha256(data).hexdigest()
    starts = range(0, max(1, len(data)), chunk_bytes)
    for start in starts:
        last = start == starts[-1]
        yield data[start : start + chunk_bytes], digest if last else ""
