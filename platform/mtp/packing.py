"""Whole-document packing: a task's problem never straddles a training block; its prompt may be input only.

The stream packing of ``mtp.data.pack`` cuts the token stream every ``block_len``
tokens, which suits a code corpus but trains a task model on problems without their
prompt (the story's first mention of a name, the graph's edges) and on answers split
from their question. Here each document is a unit ``[eos, *ids]`` (eos first: the
scorer prompts with ``[eos, *prompt]``), units are laid into blocks in order, and a
unit that does not fit the rest of a block starts the next one, the gap padded
(``pad_id`` targets are ignored by the loss).

With ``prompts``, the eos and the prompt's tokens are stored with ``LOSS_MASK_FLAG``
added: the model reads them but ``mtp.loss.mtp_targets(masked=True)`` never scores them,
so the loss is on the answer only (how Bachmann & Nagarajan train path-finding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtp.tokenizer import Tokenizer

LOSS_MASK_FLAG = 1 << 24  # above any vocabulary; a packed id >= this is an input that is never a target


class PackingError(ValueError):
    """A document cannot be packed whole (longer than a block, or its prompt is not its prefix)."""


def document_units(texts: Sequence[str], tokenizer: Tokenizer, prompts: Sequence[str] | None = None) -> list[np.ndarray]:
    """``[eos, *ids]`` per document; with ``prompts`` (each a prefix of its text), eos and prompt flagged."""
    if prompts is not None and len(prompts) != len(texts):
        raise PackingError(f"{len(prompts)} prompts for {len(texts)} documents")
    units = []
    for i, text in enumerate(texts):
        if prompts is None:
            head, tail = [], tokenizer.encode(text)
        else:
            prompt = prompts[i]
            if not text.startswith(prompt):
                raise PackingError(f"document {i}: its prompt {prompt[:40]!r} is not a prefix of its text {text[:40]!r}")
            head, tail = tokenizer.encode(prompt), tokenizer.encode(text[len(prompt):])
        unit = np.asarray([tokenizer.eos_id, *head, *tail], dtype=np.int32)
        if prompts is not None:
            unit[: 1 + len(head)] += LOSS_MASK_FLAG
        units.append(unit)
    return units


def pack_whole(units: Sequence[np.ndarray], block_len: int, pad_id: int) -> np.ndarray:
    """``[n, block_len]`` blocks holding whole units in order, each block's tail padded."""
    blocks: list[np.ndarray] = []
    current: list[np.ndarray] = []
    used = 0
    for i, unit in enumerate(units):
        if len(unit) > block_len:
            raise PackingError(f"document {i} has {len(unit)} tokens (with its eos), more than a block of "
                               f"{block_len}: raise train.seq_len or shorten the task's problems")
        if used + len(unit) > block_len:
            blocks.append(_padded(current, block_len, pad_id))
            current, used = [], 0
        current.append(unit)
        used += len(unit)
    if current:
        blocks.append(_padded(current, block_len, pad_id))
    return np.stack(blocks) if blocks else np.zeros((0, block_len), dtype=np.int32)


def _padded(units: list[np.ndarray], block_len: int, pad_id: int) -> np.ndarray:
    block = np.full(block_len, pad_id, dtype=np.int32)
    joined = np.concatenate(units)
    block[: len(joined)] = joined
    return block
