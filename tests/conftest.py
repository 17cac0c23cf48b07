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


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the tests that take the `device` fixture run (cpu, cuda); `make gpu-check` "
                          "runs them with `-m device --device cuda`")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: takes the `device` fixture (selected by the GPU check)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(request):
    """The ``--device`` the numerics tests run on (default cpu); a CUDA one that is absent fails."""
    import torch

    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"--device {name}: no CUDA device is visible")
    return torch.device(name)


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
