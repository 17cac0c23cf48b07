"""Shared fixtures: one local Ray instance for the whole session, temp MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOT = REPO / "platform"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance shared by every Ray test (starting one costs ~7 s), joined as jobs join Ray."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    from mtp.cluster.ray_env import connect

    connect("local", num_cpus=2, object_store_memory=512 * 1024**2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite-backed MLflow store for one test, set as the tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
