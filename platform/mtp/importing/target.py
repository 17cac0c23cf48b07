"""The mtp checkpoint an import writes: expected tensors, the plan checked against them, the files."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch

from mtp.checkpoint import CONFIG, WEIGHTS
from mtp.config import JobConfig, ModelConfig
from mtp.importing.stream import TensorPlan, atomic_directory, check_plan, write_safetensors
from mtp.model import MTPTransformer, init_parameter_
from mtp.tokenizer import Tokenizer

PROVENANCE = "import.json"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an ``MTPTransformer(cfg)`` checkpoint holds (built on the meta device)."""
    with torch.device("meta"):
        model = MTPTransformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fresh_plan(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> TensorPlan:
    """A newly initialised tensor, as ``MTPTransformer.reset_parameters`` makes it (seeded by name, so
    independent of the order tensors are written in)."""

    def load() -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + zlib.crc32(name.encode()))
            p = torch.empty(shape)
            init_parameter_(name, p, cfg)
        return p

    return TensorPlan(name, shape, torch.float32, f"fresh initialisation of {name}", load)


def write_checkpoint(
    out: str | Path,
    cfg: ModelConfig,
    plans: Sequence[TensorPlan],
    tokenizer: Tokenizer,
    provenance: dict[str, Any],
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Check ``plans`` against ``cfg``'s model, then write an mtp checkpoint directory atomically."""
    cfg.validate()
    check_plan(plans, expected_shapes(cfg), f"converting {provenance.get('source', '?')}")
    job = JobConfig(model=cfg)
    job.tracking.registered_model = None
    with atomic_directory(out, overwrite) as tmp:
        write_safetensors(tmp / WEIGHTS, plans, dtype)
        (tmp / CONFIG).write_text(json.dumps(job.validate().to_dict(), indent=2, sort_keys=True))
        tokenizer.save(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
    return Path(out)
