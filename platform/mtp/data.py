"""Training data: corpus sources -> tokens -> packed blocks -> per-rank batches.

Documents come from HF ``datasets`` (``load_corpus``): the embedded ``stdlib`` corpus
(the running interpreter's standard-library sources, so a fresh machine trains on
real code without a download), a local folder of source files, a local
json/jsonl/parquet/txt file, or a hub dataset with a text column. Where ``datasets``
is not installed (a bare GPU box), folder sources, the stdlib included, are read and
tokenized in plain Python instead, into the same blocks.

``prepare_data`` splits documents into train/validation by a seeded shuffle (a
document never straddles the split), tokenizes them with ``Dataset.map(num_proc=...)``
(one eos after each document as separator) and packs the token stream into
fixed-length blocks of ``seq_len + 1`` tokens. The result is cached on disk, keyed
by the source's fingerprint and every setting that changes it, so later runs (and
other workers on the node) memory-map it instead of re-tokenizing.

``BlockSampler`` hands each rank its own blocks: within an epoch the block order is
a seeded permutation, and micro-batch ``m`` of rank ``r`` is the slice
``[(m * W + r) * B, (m * W + r + 1) * B)`` of it. Slices of different (m, r) never
overlap, so shards are disjoint by construction, their union is the epoch, and the
global batch is the same whatever the world size. Its position (epoch, offset) is
all a checkpoint needs to resume the data stream exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mtp.config import DataConfig, cache_dir
from mtp.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

CACHE_VERSION = 1
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(ValueError):
    """The data source is missing, empty or unusable."""


# ----------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A resolved ``data.source``: what kind it is and where it lives."""

    kind: str  # "folder" (stdlib included), "file" or "hub"
    location: str

    def fingerprint(self, file_glob: str) -> str:
        """Changes when the underlying files change (paths, sizes, mtimes)."""
        h = hashlib.sha256(f"{self.kind}:{self.location}".encode())
        if self.kind == "folder":
            for path in _folder_files(Path(self.location), file_glob):
                st = path.stat()
                h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif self.kind == "file":
            st = Path(self.location).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_source(source: str) -> Source:
    """Classify ``data.source``; a local path that does not exist is an error here."""
    if source == "stdlib":
        return Source("folder", str(stdlib_dir()))
    path = Path(source).expanduser()
    if path.is_dir():
        return Source("folder", str(path.resolve()))
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise DataError(
                f"data.source={source!r} has an unsupported extension {path.suffix!r}; "
                f"use one of {', '.join(LOCAL_FORMATS)} or a folder"
            )
        return Source("file", str(path.resolve()))
    if source.startswith(("/", ".", "~")) or path.suffix in LOCAL_FORMATS or not source:
        raise DataError(f"data.source={source!r} does not exist")
    return Source("hub", source)


def _folder_files(folder: Path, file_glob: str) -> list[Path]:
    """Matching files, sorted; third-party packages inside the stdlib folder are skipped."""
    return sorted(p for p in folder.glob(file_glob) if p.is_file() and "site-packages" not in p.parts)


def has_datasets() -> bool:
    """Whether HF ``datasets`` imports; without it only folder sources load (``folder_texts``)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def folder_texts(cfg: DataConfig) -> list[str]:
    """The documents of a folder source (the stdlib included), in sorted path order."""
    source = resolve_source(cfg.source)
    if source.kind != "folder":
        raise DataError(
            f"data.source={cfg.source!r} needs HF datasets, which is not installed; "
            "only folder sources (the stdlib default included) load without it"
        )
    files = _folder_files(Path(source.location), cfg.file_glob)
    if not files:
        raise DataError(f"data.source={cfg.source!r} holds no files matching data.file_glob={cfg.file_glob!r}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def load_corpus(cfg: DataConfig):
    """The documents as a ``datasets.Dataset`` with one ``text`` column."""
    import datasets

    source = resolve_source(cfg.source)
    if source.kind == "folder":
        return datasets.Dataset.from_dict({"text": folder_texts(cfg)})
    try:
        if source.kind == "file":
            builder = LOCAL_FORMATS[Path(source.location).suffix]
            extra = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=source.location, split="train", **extra)
        else:
            ds = datasets.load_dataset(source.location, split=cfg.split)
    except Exception as exc:  # datasets raises many types (hub, network, parsing)
        raise DataError(f"data.source={cfg.source!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    if cfg.text_column not in ds.column_names:
        raise DataError(
            f"data.source={cfg.source!r} has no column data.text_column={cfg.text_column!r}; "
            f"its columns are {ds.column_names}"
        )
    columns = {cfg.text_column: "text", **({cfg.prompt_column: "prompt"} if cfg.prompt_column else {})}
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"data.source={cfg.source!r} has no column {missing[0]!r}; its columns are {ds.column_names}")
    ds = ds.select_columns(list(columns))
    return ds.rename_columns({k: v for k, v in columns.items() if k != v})


# ------------------------------------------------------------------ tokenization


def build_tokenizer(cfg: DataConfig, train_texts) -> Tokenizer:
    """``byte``, a ``tokenizer.json`` path, or ``bpe`` trained on the training documents."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return HFTokenizer.train_bpe(iter(train_texts), cfg.bpe_vocab_size)
    path = Path(cfg.tokenizer).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} is neither 'byte', 'bpe' nor an existing tokenizer.json")
    return HFTokenizer.from_file(path)


class _Encode:
    """Picklable batch encoder for ``Dataset.map``: token ids plus one eos per document."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        eos = self.tokenizer.eos_id
        return {"ids": [self.tokenizer.encode(text) + [eos] for text in batch["text"]]}


def _token_stream(docs, tokenizer: Tokenizer, num_proc: int) -> np.ndarray:
    """Every document's ids and one eos, concatenated; a plain list is encoded in this process."""
    if len(docs) == 0:
        return np.zeros(0, dtype=np.int32)
    if isinstance(docs, list):
        encode = _Encode(tokenizer)
        return np.concatenate([np.asarray(ids, dtype=np.int32) for ids in encode({"text": docs})["ids"]])
    encoded = docs.map(
        _Encode(tokenizer),
        batched=True,
        batch_size=64,
        num_proc=min(num_proc, len(docs)),
        remove_columns=docs.column_names,
        desc="tokenizing",
    )
    return encoded.data.column("ids").combine_chunks().flatten().to_numpy().astype(np.int32)


def pack(tokens: np.ndarray, block_len: int, pad_id: int | None = None) -> np.ndarray:
    """Cut a token stream into ``[n, block_len]`` blocks.

    The remainder is dropped, or, with ``pad_id``, padded into one last block (for a
    validation split that must not come out empty; padded targets are ignored).
    """
    n_full = len(tokens) // block_len
    blocks = tokens[: n_full * block_len].reshape(n_full, block_len)
    rest = tokens[n_full * block_len :]
    if pad_id is not None and len(rest):
        tail = np.full((1, block_len), pad_id, dtype=tokens.dtype)
        tail[0, : len(rest)] = rest
        blocks = np.concatenate([blocks, tail])
    return blocks


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte."""
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    if isinstance(tokenizer, ByteTokenizer):
        return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    return np.array(
        [0 if i in specials else len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)],
        dtype=np.int64,
    )


# ----------------------------------------------------------------------- prepare


@dataclass
class PackedData:
    """Packed train/validation blocks (``[n, seq_len + 1]`` int32) and their tokenizer."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    token_bytes: np.ndarray
    n_documents: int
    directory: Path
    masked: bool = False  # prompt tokens carry mtp.packing.LOSS_MASK_FLAG: inputs only


def _cache_key(cfg: DataConfig, source: Source, block_len: int) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "cache_dir", "source")}
    payload = json.dumps(
        {"v": CACHE_VERSION, "source": source.fingerprint(cfg.file_glob), "block_len": block_len, **settings},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def prepare_data(cfg: DataConfig, seq_len: int) -> PackedData:
    """Load, split, tokenize and pack the corpus, or reuse the cached result.

    Safe to call from several processes at once: each writes to a private temporary
    directory and renames it into place; the first rename wins.
    """
    source = resolve_source(cfg.source)
    block_len = seq_len + 1
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir("data")
    directory = root / _cache_key(cfg, source, block_len)
    if not (directory / "meta.json").is_file():
        _build(cfg, block_len, directory)
    return _load(directory)


def _shuffled_documents(cfg: DataConfig):
    """The corpus in a seeded order: a ``datasets.Dataset``, or without datasets a list of texts
    in the same order (``Dataset.shuffle(seed)`` is ``default_rng(seed).permutation``)."""
    if has_datasets():
        return load_corpus(cfg).shuffle(seed=cfg.seed).flatten_indices()
    texts = folder_texts(cfg)
    return [texts[i] for i in np.random.default_rng(cfg.seed).permutation(len(texts))]


def _select(docs, start: int, stop: int):
    if isinstance(docs, list):
        return docs[start:stop]
    return docs.select(range(start, stop) if stop > start else [])  # an empty tail range trips datasets


def _build(cfg: DataConfig, block_len: int, directory: Path) -> None:
    docs = _shuffled_documents(cfg)
    if cfg.max_documents is not None:
        docs = _select(docs, 0, min(cfg.max_documents, len(docs)))
    if len(docs) == 0:
        raise DataError(f"data.source={cfg.source!r} holds no documents")
    n_val = int(round(len(docs) * cfg.val_fraction))
    if cfg.val_fraction > 0:
        n_val = min(max(n_val, 1), len(docs) - 1)
    split = len(docs) - n_val
    train_docs = _select(docs, 0, split)
    val_docs = _select(docs, split, len(docs))
    tokenizer = build_tokenizer(cfg, train_docs if isinstance(train_docs, list) else train_docs["text"])
    if cfg.pack == "whole":
        train, val = (_pack_whole(d, tokenizer, block_len, cfg.prompt_column is not None) for d in (train_docs, val_docs))
    else:
        train = pack(_token_stream(train_docs, tokenizer, cfg.num_proc), block_len)
        val = pack(_token_stream(val_docs, tokenizer, cfg.num_proc), block_len, pad_id=tokenizer.pad_id)
    if len(train) == 0:
        raise DataError(f"data.source={cfg.source!r} yields no training block of {block_len} tokens; use a shorter train.seq_len")

    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "train.npy", train)
    np.save(tmp / "val.npy", val)
    tokenizer.save(tmp)
    meta = {"source": cfg.source, "n_documents": len(docs), "n_val_documents": n_val, "block_len": block_len,
            "masked": cfg.prompt_column is not None}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, directory)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _load(directory: Path) -> PackedData:
    meta = json.loads((directory / "meta.json").read_text())
    tokenizer = load_tokenizer(directory)
    return PackedData(
        train=np.load(directory / "train.npy", mmap_mode="r"),
        val=np.load(directory / "val.npy", mmap_mode="r"),
        tokenizer=tokenizer,
        token_bytes=token_byte_lengths(tokenizer),
        n_documents=meta["n_documents"],
        directory=directory,
        masked=meta.get("masked", False),
    )


def _pack_whole(docs, tokenizer: Tokenizer, block_len: int, masked: bool) -> np.ndarray:
    """A task corpus: each document whole in one block, its prompt input-only if ``masked`` (``mtp.packing``)."""
    from mtp.packing import PackingError, document_units, pack_whole

    texts = docs if isinstance(docs, list) else docs["text"]
    prompts = (None if isinstance(docs, list) else docs["prompt"]) if masked else None
    try:
        return pack_whole(document_units(list(texts), tokenizer, None if prompts is None else list(prompts)),
                          block_len, tokenizer.pad_id)
    except PackingError as exc:
        raise DataError(f"data.pack=whole: {exc}") from None


# ---------------------------------------------------------------------- sharding


@dataclass
class DataPosition:
    """Where the data stream is: epoch and blocks consumed in it (the same on every rank)."""

    epoch: int = 0
    offset: int = 0


class BlockSampler:
    """Per-rank micro-batches of block indices; see the module docstring for the layout."""

    def __init__(self, n_blocks: int, batch_size: int, rank: int, world_size: int, seed: int,
                 position: DataPosition | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.global_batch = batch_size * world_size
        if n_blocks < self.global_batch:
            raise DataError(
                f"the training split has {n_blocks} blocks, fewer than one global micro-batch "
                f"(train.batch_size={batch_size} x {world_size} workers); use more data or a smaller batch"
            )
        self.n_blocks, self.batch_size, self.rank, self.seed = n_blocks, batch_size, rank, seed
        self.seek(position or DataPosition())

    def seek(self, position: DataPosition) -> None:
        """Continue from a saved position (the epoch's order is recomputed from the seed)."""
        self.position = position
        self._order = self._permutation(position.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)

    def next_indices(self) -> np.ndarray:
        """This rank's next micro-batch; advances the shared position by one global micro-batch."""
        if self.position.offset + self.global_batch > self.n_blocks:
            self.seek(DataPosition(self.position.epoch + 1, 0))
        start = self.position.offset + self.rank * self.batch_size
        self.position = DataPosition(self.position.epoch, self.position.offset + self.global_batch)
        return self._order[start : start + self.batch_size]

    def epoch_indices(self) -> Iterator[np.ndarray]:
        """Every micro-batch this rank sees in the current epoch (for inspection and tests)."""
        epoch = self.position.epoch
        while self.position.epoch == epoch and self.position.offset + self.global_batch <= self.n_blocks:
            yield self.next_indices()


def gather_blocks(blocks: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` of (memory-mapped) ``blocks``, as int64: the dtype of token ids in torch."""
    return np.asarray(blocks[indices], dtype=np.int64)


class BatchPrefetcher:
    """This rank's micro-batches, each gathered on a background thread while the one before trains.

    The sampler runs one micro-batch ahead, so ``position`` (what a checkpoint saves)
    is the data position after the last batch handed out, not the sampler's.
    """

    def __init__(self, sampler: BlockSampler, blocks: np.ndarray):
        self.sampler, self.blocks = sampler, blocks
        self.position = sampler.position
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtp-prefetch")
        self._ahead: tuple[Future, DataPosition] | None = None

    def _fetch(self) -> tuple[Future, DataPosition]:
        indices = self.sampler.next_indices()
        return self._pool.submit(gather_blocks, self.blocks, indices), self.sampler.position

    def next(self) -> np.ndarray:
        """The next micro-batch ``[batch_size, block_len]``; starts gathering the one after."""
        future, position = self._ahead or self._fetch()
        self._ahead = self._fetch()
        self.position = position
        return future.result()

    def seek(self, position: DataPosition) -> None:
        """Continue from ``position``; a batch gathered ahead is dropped."""
        self._ahead = None
        self.sampler.seek(position)
        self.position = position

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True)


def val_indices(n_blocks: int, n_wanted: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's validation blocks: a strided, disjoint slice of the first ``n_wanted``."""
    return np.arange(min(n_wanted, n_blocks))[rank::world_size]
