"""What a replica says about the model it serves (``GET /v1/models``).

The version is what an operator needs to tell two deployments apart: the
registry version or run id for MLflow URIs, else a fingerprint of the files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mtp.checkpoint import CONFIG, WEIGHTS, read_config
from mtp.tracking.registry import ModelRef

FINGERPRINT_BYTES = 1 << 20


def model_version(uri: str, directory: Path) -> str:
    """``models:/name/3`` -> ``3``; ``runs:/<id>/path`` -> ``<id>``; a path -> a content fingerprint."""
    ref = ModelRef.parse(uri)
    if ref is not None:
        return ref.version or f"{ref.name}@{ref.alias}"
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0]
    return fingerprint(directory)


def fingerprint(directory: Path) -> str:
    """sha256 of the config, the weights' size and their first and last MiB (cheap for big files)."""
    digest = hashlib.sha256((directory / CONFIG).read_bytes())
    weights = directory / WEIGHTS
    size = weights.stat().st_size
    digest.update(str(size).encode())
    with weights.open("rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(0, size - FINGERPRINT_BYTES))
        digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:12]


def model_card(name: str, uri: str, directory: Path, device: str) -> dict[str, Any]:
    config = read_config(directory)
    model = config["model"]
    return {
        "id": name,
        "object": "model",
        "owned_by": "mtp",
        "version": model_version(uri, directory),
        "source": uri,
        "n_future": model["n_future"],
        "max_seq_len": model["max_seq_len"],
        "preset": config.get("train", {}).get("preset"),
        "device": device,
    }
