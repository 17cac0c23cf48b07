"""Whole-document packing, the answer-only loss mask and the all-heads-next-token targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtp.config import DataConfig
from mtp.data import DataError, prepare_data
from mtp.loss import IGNORE_INDEX, mtp_targets
from mtp.packing import LOSS_MASK_FLAG, PackingError, document_units, pack_whole
from mtp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _documents(blocks: np.ndarray) -> list[str]:
    """The documents of packed blocks, read back: split at eos, padding and flags removed."""
    out = []
    for block in blocks:
        ids = [int(i) % LOSS_MASK_FLAG for i in block if i != TOK.pad_id]
        text = bytes(i if i < 256 else 0 for i in ids).decode()
        out += [d for d in text.split("\0") if d]
    return out


def test_every_document_is_whole_in_one_block_in_order():
    texts = ["abc=1", "defgh=22", "ij=3", "klmnopq=4", "r=5"]
    blocks = pack_whole(document_units(texts, TOK), block_len=12, pad_id=TOK.pad_id)
    assert blocks.shape[1] == 12
    assert _documents(blocks) == texts  # none cut, none lost, same order
    for block in blocks:  # each block starts at a document (eos first) and ends in padding or a document's end
        assert block[0] == TOK.eos_id
    assert blocks[0].tolist().count(TOK.pad_id) == 12 - (1 + 5)  # "defgh=22" (9) did not fit after "abc=1" (6)


def test_a_document_longer_than_a_block_is_an_error_naming_it():
    with pytest.raises(PackingError, match="document 1 has 13 tokens"):
        pack_whole(document_units(["ab", "x" * 12], TOK), block_len=10, pad_id=TOK.pad_id)
    with pytest.raises(PackingError, match="not a prefix"):
        document_units(["abc=1"], TOK, prompts=["xyz="])


def test_prompt_is_input_only_and_heads_target_the_answer():
    blocks = pack_whole(document_units(["ab=12", "c=3"], TOK, prompts=["ab=", "c="]), block_len=10,
                        pad_id=TOK.pad_id)
    tokens = torch.from_numpy(blocks.astype(np.int64))
    inputs, targets = mtp_targets(tokens, 2, TOK.pad_id, masked=True)
    assert inputs.max() < TOK.vocab_size  # the model never sees a flagged id
    assert bytes(inputs[0, :9].tolist()[1:4]) == b"ab="
    scored = [TOK.decode([t]) for t in targets[0, 0].tolist() if t != IGNORE_INDEX]
    assert scored == ["1", "2", "3"]  # head 0: the answers' bytes only, not the prompts, eos or padding
    scored2 = [TOK.decode([t]) for t in targets[1, 0].tolist() if t != IGNORE_INDEX]
    assert scored2 == ["1", "2", "3"]  # head 1 predicts the same bytes one position earlier
    assert (targets[1, 0] != IGNORE_INDEX).nonzero().flatten().tolist() == [2, 3, 7]
    unmasked_inputs, _ = mtp_targets(tokens % LOSS_MASK_FLAG, 2, TOK.pad_id)
    assert torch.equal(inputs, unmasked_inputs)


def test_next_token_only_trains_every_head_on_t_plus_1():
    tokens = torch.arange(10).view(1, 10)
    _, future = mtp_targets(tokens, 3)
    _, nxt = mtp_targets(tokens, 3, next_token_only=True)
    assert torch.equal(future[0], nxt[0])
    for i in range(3):
        assert torch.equal(nxt[i], nxt[0])
    assert future[2, 0, 0] == 3 and nxt[2, 0, 0] == 1


def test_prepare_data_packs_a_task_corpus_whole(tmp_path):
    corpus = tmp_path / "task.jsonl"
    rows = [{"text": f"q{i}=" + "a" * (i % 7), "prompt": f"q{i}="} for i in range(200)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(corpus), pack="whole", prompt_column="prompt", val_fraction=0.1, num_proc=1,
                     cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, seq_len=31)
    assert data.masked and data.train.shape[1] == 32
    assert sorted(_documents(data.train) + _documents(data.val)) == sorted(r["text"] for r in rows)
    with pytest.raises(DataError, match="more than a block"):
        prepare_data(DataConfig(source=str(corpus), pack="whole", num_proc=1, cache_dir=str(tmp_path / "c2")), seq_len=4)
