"""The step's token embedding resolves pending ids and looks them up as the reference does.

``embed_tokens`` (kernels/embed_tokens.py) is checked bit for bit against ``embed_tokens_ref`` and
``F.embedding`` of the resolved ids: rows whose id the previous step sampled (``prev_rows >= 0``)
read it from ``prev_tokens``, the others keep ``input_ids``; hidden sizes that are not a power of
two and wider than one program's block. The output starts as whatever the allocator holds, so a
column never written fails. On CPU the kernel runs in the Triton interpreter; on the GPU the
layer's dispatch to it is checked against the layer's torch path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import embed_tokens as kernel
from kernels.embed_tokens import embed_tokens, embed_tokens_ref
from models.layers.embed_head import VocabParallelEmbedding
from models.parallel import SINGLE_RANK

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _step(vocab: int, hidden: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(hidden)
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype).to(DEVICE)
    input_ids = torch.tensor([3, 0, 9, 1, 4, 2], device=DEVICE)
    prev_rows = torch.tensor([-1, 2, -1, 0, -1, 1], device=DEVICE)  # tokens 1, 3, 5 pending
    prev_tokens = torch.tensor([7, 5, 8, 6], device=DEVICE)
    return weight, input_ids, prev_rows, prev_tokens


@pytest.mark.parametrize("hidden", [48, 100])
def test_pending_ids_come_from_prev_tokens_and_the_rest_from_input_ids(hidden: int) -> None:
    weight, input_ids, prev_rows, prev_tokens = _step(10, hidden)
    got = embed_tokens(weight, input_ids, prev_rows, prev_tokens)
    resolved = torch.tensor([3, 8, 9, 7, 4, 5], device=DEVICE)
    assert torch.equal(got, F.embedding(resolved, weight))
    assert torch.equal(got, embed_tokens_ref(weight, input_ids, prev_rows, prev_tokens))


def test_rows_wider_than_one_program_are_copied_whole(monkeypatch) -> None:
    monkeypatch.setattr(kernel, "BLOCK_HIDDEN", 32)  # 100 columns: four programs a token
    weight, input_ids, prev_rows, prev_tokens = _step(10, 100)
    got = embed_tokens(weight, input_ids, prev_rows, prev_tokens)
    assert torch.equal(got, embed_tokens_ref(weight, input_ids, prev_rows, prev_tokens))


def test_without_pending_ids_it_is_the_plain_lookup() -> None:
    weight, input_ids, _, _ = _step(10, 48, torch.bfloat16)
    assert torch.equal(embed_tokens(weight, input_ids), F.embedding(input_ids, weight))
    assert embed_tokens(weight, input_ids[:0]).shape == (0, 48)


def test_bad_ids_are_refused() -> None:
    weight, input_ids, prev_rows, prev_tokens = _step(10, 48)
    with pytest.raises(ValueError, match="input_ids"):
        embed_tokens(weight, input_ids.int())
    with pytest.raises(ValueError, match="prev_rows"):
        embed_tokens(weight, input_ids, prev_rows[:3], prev_tokens)


@pytest.mark.gpu
def test_the_layer_on_cuda_gives_its_torch_path_result() -> None:
    layer = VocabParallelEmbedding(151936, 1024, SINGLE_RANK)
    layer.weight.data = torch.randn(151936, 1024, dtype=torch.bfloat16)
    input_ids = torch.randint(0, 151936, (37,))
    prev_rows = torch.where(torch.arange(37) % 3 == 0, torch.arange(37) % 16, -1)
    prev_tokens = torch.randint(0, 151936, (16,))
    want = layer(input_ids, prev_rows, prev_tokens)  # CPU: the torch path
    layer.cuda()
    got = layer(input_ids.cuda(), prev_rows.cuda(), prev_tokens.cuda())
    assert torch.equal(got.cpu(), want)
