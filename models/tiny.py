"""The embedded tiny default model: a deterministic random Qwen3 checkpoint plus a trained tokenizer.

`python -m models.tiny --out DIR` writes a complete Hugging Face style model directory
(config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
that transformers, our worker and our scheduler can all load. The tokenizer is a byte-level BPE
trained on `tiny_corpus.txt`; the weights come from a seeded generator, so every run writes the
same bytes. The output is random: it is for tests and smoke runs, not for reading.

This module does not load or run the model; it only writes files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    import torch

CORPUS_PATH = Path(__file__).with_name("tiny_corpus.txt")
MARKER_NAME = "nanoserve_tiny.json"
MODEL_FILES = (  # what _write_files writes (the marker lists their hashes)
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
TARGET_VOCAB_SIZE = 2000
VOCAB_MULTIPLE = 64
MODEL_MAX_LENGTH = 2048
SEED = 0
INIT_STD = 0.02

HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE_SIZE = 128

CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def train_tokenizer(corpus_path: Path = CORPUS_PATH) -> Tokenizer:
    """Train the byte-level BPE; the special tokens get ids 0, 1, 2 in SPECIAL_TOKENS order."""
    return bpe_tokenizer([corpus_path.read_text(encoding="utf-8")], TARGET_VOCAB_SIZE)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of vocab_size trained on texts, SPECIAL_TOKENS first (ids 0, 1, 2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict[str, object]:
    """The tokenizer_config.json that transformers' AutoTokenizer reads, Qwen3 style."""
    added_tokens_decoder = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def padded_vocab_size(tokenizer_vocab_size: int) -> int:
    return -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> dict[str, object]:
    """A Qwen3 config.json in the layout of the released Qwen3 checkpoints."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "max_window_layers": NUM_LAYERS,
        "model_type": "qwen3",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def parameter_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face Qwen3 parameter names -> shapes, in a fixed order (the order weights are drawn)."""
    q_dim, kv_dim = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q_dim, HIDDEN_SIZE),
            p + "self_attn.k_proj.weight": (kv_dim, HIDDEN_SIZE),
            p + "self_attn.v_proj.weight": (kv_dim, HIDDEN_SIZE),
            p + "self_attn.o_proj.weight": (HIDDEN_SIZE, q_dim),
            p + "self_attn.q_norm.weight": (HEAD_DIM,),
            p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            p + "mlp.up_proj.weight": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            p + "mlp.down_proj.weight": (HIDDEN_SIZE, INTERMEDIATE_SIZE),
            p + "input_layernorm.weight": (HIDDEN_SIZE,),
            p + "post_attention_layernorm.weight": (HIDDEN_SIZE,),
        }
    shapes["model.norm.weight"] = (HIDDEN_SIZE,)
    return shapes


def random_weights(vocab_size: int, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Matrices ~ N(0, INIT_STD) from one seeded CPU generator; norm weights are ones."""
    import torch  # imported here so that a re-run that finds the model complete stays fast

    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in parameter_shapes(vocab_size).items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            weights[name] = torch.normal(0.0, INIT_STD, shape, generator=generator)
    return weights


def recipe_digest() -> str:
    """Hash of everything the output depends on: the corpus and this file's source."""
    digest = hashlib.sha256(CORPUS_PATH.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_complete(out_dir: Path, digest: str) -> bool:
    """True when out_dir holds every file the marker lists, unchanged, from this same recipe."""
    marker_path = out_dir / MARKER_NAME
    if not marker_path.is_file():
        return False
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    if marker.get("recipe") != digest:
        return False
    files: dict[str, str] = marker.get("files", {})
    return bool(files) and all(
        (out_dir / name).is_file() and _sha256(out_dir / name) == sha for name, sha in files.items()
    )


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the trained tokenizer has no {token!r}")
    return token_id


def _write_files(out_dir: Path) -> list[str]:
    tokenizer = train_tokenizer()
    eos_token_id = _token_id(tokenizer, EOS_TOKEN)
    bos_token_id = _token_id(tokenizer, PAD_TOKEN)
    vocab_size = padded_vocab_size(tokenizer.get_vocab_size(with_added_tokens=True))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(tokenizer))
    _write_json(out_dir / "config.json", model_config(vocab_size, eos_token_id, bos_token_id))
    generation_config = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    _write_json(out_dir / "generation_config.json", generation_config)
    weights = random_weights(vocab_size)
    from safetensors.torch import save_file  # needs torch, which random_weights has just imported

    save_file(weights, str(out_dir / "model.safetensors"), {"format": "pt"})
    return list(MODEL_FILES)


def write_tiny_model(out_dir: Path) -> Path:
    """Write the tiny model into out_dir (created if needed) and return it.

    Skips the work when out_dir already holds a complete copy from the same recipe. The marker is
    written last, so an interrupted run is redone next time.
    """
    out_dir = Path(out_dir)
    digest = recipe_digest()
    if is_complete(out_dir, digest):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).unlink(missing_ok=True)
    names = _write_files(out_dir)
    marker = {"recipe": digest, "files": {name: _sha256(out_dir / name) for name in names}}
    _write_json(out_dir / MARKER_NAME, marker)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out))


if __name__ == "__main__":
    main()
