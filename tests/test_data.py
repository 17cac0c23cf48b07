"""Data: sources, packing with separators, deterministic shuffles, disjoint per-rank shards."""

import json

import numpy as np
import pytest

from mtp.config import DataConfig
from mtp.data import BlockSampler, DataError, DataPosition, load_corpus, pack, prepare_data, resolve_source
from mtp.tokenizer import ByteTokenizer


def _corpus(tmp_path, n_docs=40):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(n_docs):
        (folder / f"mod_{i:03d}.py").write_text(f"def f_{i}(x):\n    return x * {i}\n" * (1 + i % 5))
    return folder


def _cfg(tmp_path, source, **kw):
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), num_proc=1, **kw)


def _documents(blocks: np.ndarray) -> list[str]:
    """Split packed blocks back into documents at the eos separators (pads dropped)."""
    tok = ByteTokenizer()
    stream = blocks.reshape(-1)
    return [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)]


def test_packing_keeps_documents_separated_by_eos(tmp_path):
    folder = _corpus(tmp_path)
    data = prepare_data(_cfg(tmp_path, folder, val_fraction=0.0), seq_len=31)
    assert data.train.shape[1] == 32 and data.train.dtype == np.int32
    originals = {p.read_text() for p in folder.iterdir()}
    complete = _documents(data.train)[:-1]  # the last piece may be cut by the dropped remainder
    assert len(complete) >= 30 and len(set(complete)) == len(complete) and set(complete) <= originals
    total = sum(len(text.encode()) + 1 for text in originals)
    assert total - 32 < data.train.size <= total


def test_validation_holds_out_whole_documents_and_pads_its_tail(tmp_path):
    folder = _corpus(tmp_path)
    data = prepare_data(_cfg(tmp_path, folder, val_fraction=0.1), seq_len=31)
    assert data.val[-1, -1] == ByteTokenizer().pad_id
    val_docs = _documents(data.val)[:-1]
    train_docs = _documents(data.train)[:-1]
    originals = {p.read_text() for p in folder.iterdir()}
    assert len(val_docs) == 4 and set(val_docs) <= originals
    assert set(val_docs).isdisjoint(train_docs)


def test_shuffle_is_deterministic_by_seed_and_cached(tmp_path):
    folder = _corpus(tmp_path)
    a = prepare_data(_cfg(tmp_path, folder, seed=1), seq_len=15)
    b = prepare_data(_cfg(tmp_path, folder, seed=1), seq_len=15)
    c = prepare_data(_cfg(tmp_path, folder, seed=2), seq_len=15)
    assert a.directory == b.directory and np.array_equal(a.train, b.train)
    assert a.directory != c.directory and not np.array_equal(a.train, c.train)
    s1 = BlockSampler(100, 4, 0, 1, seed=3)
    s2 = BlockSampler(100, 4, 0, 1, seed=3)
    assert all(np.array_equal(s1.next_indices(), s2.next_indices()) for _ in range(30))


def test_two_rank_shards_are_disjoint_and_cover_the_epoch():
    n_blocks, batch = 96, 4
    ranks = [BlockSampler(n_blocks, batch, rank, 2, seed=7) for rank in range(2)]
    seen = [np.concatenate(list(s.epoch_indices())) for s in ranks]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(n_blocks))
    # the global micro-batch does not depend on the world size
    single = BlockSampler(n_blocks, 2 * batch, 0, 1, seed=7)
    two = [BlockSampler(n_blocks, batch, r, 2, seed=7) for r in range(2)]
    for _ in range(n_blocks // (2 * batch) + 3):  # crosses into the next epoch
        assert np.array_equal(single.next_indices(), np.concatenate([s.next_indices() for s in two]))


def test_sampler_resumes_from_its_position():
    a = BlockSampler(50, 4, 1, 2, seed=0)
    for _ in range(9):
        a.next_indices()
    b = BlockSampler(50, 4, 1, 2, seed=0, position=DataPosition(**vars(a.position)))
    assert all(np.array_equal(a.next_indices(), b.next_indices()) for _ in range(10))
    assert a.position.epoch >= 1


def test_local_json_and_text_files_load(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": f"print({i})"}) for i in range(5)))
    ds = load_corpus(DataConfig(source=str(jsonl), text_column="content"))
    assert ds.column_names == ["text"] and ds[3]["text"] == "print(3)"
    txt = tmp_path / "one.txt"
    txt.write_text("line one\nline two\n")
    assert load_corpus(DataConfig(source=str(txt)))["text"] == ["line one\nline two\n"]


def test_bad_sources_fail_with_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    bad = tmp_path / "data.csv"
    bad.write_text("a,b")
    with pytest.raises(DataError, match="unsupported extension"):
        resolve_source(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files matching"):
        load_corpus(DataConfig(source=str(tmp_path / "empty")))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match="no column data.text_column='text'"):
        load_corpus(DataConfig(source=str(jsonl)))
    with pytest.raises(DataError, match="could not be loaded"):  # offline in tests: the hub is unreachable
        load_corpus(DataConfig(source="no-such-org/no-such-dataset"))
    with pytest.raises(DataError, match="no training block"):
        prepare_data(_cfg(tmp_path, _corpus(tmp_path, 2), val_fraction=0.0), seq_len=4000)


def test_pack_drops_or_pads_the_remainder():
    tokens = np.arange(10, dtype=np.int32)
    assert pack(tokens, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack(tokens, 4, pad_id=-1)[-1].tolist() == [8, 9, -1, -1]
