"""Tokenizers behind one small interface: byte-level (the default) and HF ``tokenizers``.

The byte tokenizer needs no training and no files, and byte-level models are where
the paper's multi-token speedups are largest. A BPE tokenizer (loaded from a
``tokenizer.json`` or trained on the corpus) serves token-level models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

TOKENIZER_META = "tokenizer_meta.json"
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then the special tokens (bos, eos, pad, unk): 260 ids."""

    kind = "byte"

    def __init__(self) -> None:
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = range(256, 256 + len(SPECIAL_TOKENS))
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one id (for streaming output that may split a UTF-8 character)."""
        return bytes([token_id]) if 0 <= token_id < 256 else b""

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / TOKENIZER_META).write_text(json.dumps({"kind": self.kind}))


class HFTokenizer:
    """A Hugging Face ``tokenizers`` model, with the same special tokens as the byte one.

    A pretrained model's tokenizer (``mtp.importing``) keeps its own special tokens:
    ``special_ids`` names them (``bos``, ``eos``, ``pad``, ``unk``), and
    ``add_special_tokens`` lets its post-processor add them (Llama's BOS) when encoding.
    Both are saved in ``tokenizer_meta.json`` beside ``tokenizer.json``.
    """

    kind = "hf"

    def __init__(self, tokenizer, special_ids: dict[str, int] | None = None, add_special_tokens: bool = False) -> None:
        self._tok = tokenizer  # tokenizers.Tokenizer
        if special_ids is None:
            ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
            if missing:
                raise ValueError(f"tokenizer lacks the special tokens {missing}; add them before training with mtp")
            special_ids = dict(zip(("bos", "eos", "pad", "unk"), ids))
        self.special_ids = dict(special_ids)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (self.special_ids[k] for k in ("bos", "eos", "pad", "unk"))
        self.add_special_tokens = add_special_tokens
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """A ``tokenizer.json``; a ``tokenizer_meta.json`` beside it supplies its special ids."""
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        meta_path = path.with_name(TOKENIZER_META)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(_Tok.from_file(str(path)), meta.get("special_ids"), meta.get("add_special_tokens", False))

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "HFTokenizer":
        """Byte-level BPE trained on ``texts`` (whitespace kept, as code needs)."""
        from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

        tok = _Tok(models.BPE(unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def special_tokens(self) -> dict[str, str]:
        """The text of each special token (``bos``, ``eos``, ``pad``, ``unk``)."""
        return {kind: self._tok.id_to_token(i) for kind, i in self.special_ids.items()}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.bos_id, self.eos_id, self.pad_id, self.unk_id}
        return self._tok.decode([i for i in ids if i not in specials])

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._tok.save(str(Path(directory) / "tokenizer.json"))
        meta: dict = {"kind": self.kind}
        if self.special_ids != dict(zip(("bos", "eos", "pad", "unk"), (self._tok.token_to_id(t) for t in SPECIAL_TOKENS))):
            meta["special_ids"] = self.special_ids
        if self.add_special_tokens:
            meta["add_special_tokens"] = True
        (Path(directory) / TOKENIZER_META).write_text(json.dumps(meta))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what ``save`` wrote into a checkpoint directory."""
    meta_path = Path(directory) / TOKENIZER_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_META} in {str(directory)!r}: not a saved tokenizer")
    kind = json.loads(meta_path.read_text())["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_file(Path(directory) / "tokenizer.json")  # reads the same meta for its special ids
    raise ValueError(f"unknown tokenizer kind {kind!r} in {meta_path}")
