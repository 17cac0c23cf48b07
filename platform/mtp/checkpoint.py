"""Checkpoints: the single hand-off between training, evaluation and serving.

A checkpoint directory holds

* ``model.safetensors``: the weights (no pickle, loadable anywhere);
* ``config.json``: the full job config (``model`` section builds the network);
* the tokenizer (``tokenizer_meta.json``, plus ``tokenizer.json`` for BPE);
* ``train_state.pt`` (optional): optimizer, scheduler, RNG and data position, for resuming.

Every function here takes a local directory: an MLflow URI (``models:/name@alias``,
``runs:/id/path``) is resolved first, by the caller, with
``mtp.tracking.registry.resolve_checkpoint``. So the core imports no MLflow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mtp.config import JobConfig, ModelConfig, model_config_from_dict
from mtp.model import MTPTransformer
from mtp.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"


def save_checkpoint(
    directory: str | Path,
    model: MTPTransformer,
    config: JobConfig | dict[str, Any],
    tokenizer: Tokenizer,
    train_state: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint atomically (to ``directory.tmp``, then renamed).

    ``state_dict`` overrides ``model.state_dict()`` (e.g. a gathered FSDP state).
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    cfg_dict = config.to_dict() if isinstance(config, JobConfig) else dict(config)
    (tmp / CONFIG).write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
    tokenizer.save(tmp)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        _rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a checkpoint directory: it has no {CONFIG} "
                                "(an MLflow URI is resolved first: mtp.tracking.registry.resolve_checkpoint)")
    return json.loads(path.read_text())


def model_config(directory: str | Path) -> ModelConfig:
    return model_config_from_dict(read_config(directory)["model"])


def load_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[MTPTransformer, Tokenizer, dict[str, Any]]:
    """Load (model in eval mode, tokenizer, full config dict) for inference."""
    directory = Path(directory)
    config = read_config(directory)
    model = MTPTransformer(model_config_from_dict(config["model"]))
    state = load_file(str(directory / WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(directory)!r} does not match its config: missing={missing} unexpected={unexpected}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(directory), config


def load_train_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The resume state, or None for an inference-only checkpoint."""
    path = Path(directory) / TRAIN_STATE
    return torch.load(path, map_location=map_location, weights_only=False) if path.is_file() else None


# ------------------------------------------------------------------- n -> n' transfer

# Model settings that must agree for a trunk to be reused (n_future may differ; the trunk depth is
# compared as ``n_trunk_layers``, since ``param_matched`` ties it to n_future).
_TRUNK_FIELDS = ("vocab_size", "dim", "n_heads", "kv_heads", "hidden_dim", "n_trunk_layers", "rope_theta", "norm_eps",
                 "attn_bias", "tie_embeddings", "rope_scaling")


def transfer_weights(model: MTPTransformer, source: str | Path) -> dict[str, list[int]]:
    """Initialise ``model`` from another checkpoint whose ``n_future`` may differ (paper §3.6).

    The embedding, trunk, shared norm and unembedding are copied; heads that exist in
    both are copied; heads beyond the new ``n_future`` are dropped; heads the source
    lacks keep ``model``'s fresh initialisation. Returns which heads were kept,
    dropped and newly initialised. A trunk of another shape raises ValueError naming
    the setting.
    """
    directory = Path(source)
    src_cfg = model_config(directory)
    mismatched = [f"{name}: {getattr(src_cfg, name)} in the source, {getattr(model.cfg, name)} here"
                  for name in _TRUNK_FIELDS if getattr(src_cfg, name) != getattr(model.cfg, name)]
    if mismatched:
        raise ValueError(f"cannot initialise from {str(source)!r}: its trunk differs ({'; '.join(mismatched)})")
    state = load_file(str(directory / WEIGHTS), device="cpu")
    n_src, n_dst = src_cfg.n_future, model.cfg.n_future
    kept = list(range(min(n_src, n_dst)))
    target = model.state_dict()
    mapped = {k: v for k, v in state.items() if not k.startswith("heads.") or int(k.split(".")[1]) < n_dst}
    unknown = set(mapped) - set(target)
    if unknown:
        raise ValueError(f"cannot initialise from {str(source)!r}: unexpected weights {sorted(unknown)[:5]}")
    with torch.no_grad():
        for key, value in mapped.items():
            target[key].copy_(value)
    return {"kept_heads": kept, "dropped_heads": list(range(n_dst, n_src)), "new_heads": list(range(n_src, n_dst))}


# What a finetune takes from its ``train.init_from`` checkpoint: everything that shapes the trunk
# (not n_future, param_matched, init_std: the new heads' business).
INHERITED = ("vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_hidden", "multiple_of", "max_seq_len", "rope_theta",
              "norm_eps", "attn_bias", "tie_embeddings", "rope_scaling")


def inherit_source_model(cfg: JobConfig, directory: str | Path) -> JobConfig:
    """Take the model's shape and tokenizer from ``directory``, the checkpoint ``train.init_from`` names.

    A finetune (``--init-from``, an imported model) trains the source's trunk, so its
    width, depth, rotary settings and tokenizer are the source's, whatever preset the
    job names; ``n_future`` and ``param_matched`` stay the job's, with ``n_layers``
    set so that the trunk keeps the source's depth. Idempotent; returns ``cfg`` validated.
    """
    directory = Path(directory)
    src = model_config(directory)
    for name in INHERITED:
        setattr(cfg.model, name, getattr(src, name))
    cfg.model.n_layers = src.n_trunk_layers + 1 + (cfg.model.n_future - 1 if cfg.model.param_matched else 0)
    cfg.data.tokenizer = str(directory / "tokenizer.json") if (directory / "tokenizer.json").is_file() else "byte"
    if cfg.train.seq_len is not None and cfg.train.seq_len > cfg.model.max_seq_len:
        cfg.train.seq_len = cfg.model.max_seq_len
    return cfg.validate()


def source_run_id(directory: str | Path) -> str | None:
    """The MLflow run that trained a checkpoint (recorded in its config), if any."""
    return read_config(directory).get("tracking", {}).get("run_id")
