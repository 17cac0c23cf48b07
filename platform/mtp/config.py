"""Configuration: one set of dataclasses that flows from the job script to every worker.

A config is built from defaults, then a YAML file, then dotted overrides
(``train.lr=3e-4``), and validated once, so a bad value fails before any work
starts with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtp.specs import ConfigError, build, coerce


# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Shape of a multi-token-prediction transformer.

    ``n_layers`` is the depth of the next-token model: a trunk of ``n_layers - 1``
    blocks plus one head block. With ``n_future`` heads the trunk keeps its depth, so
    the model grows by ``n_future - 1`` blocks, unless ``param_matched`` removes
    that many trunk blocks, as the paper does for its comparisons.
    """

    vocab_size: int = 260
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    multiple_of: int = 64
    n_future: int = 4
    param_matched: bool = False
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # What imported models (mtp.importing) need; the defaults are the platform's own architecture.
    attn_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    tie_embeddings: bool = False  # the unembedding is the embedding matrix
    rope_scaling: dict[str, Any] | None = None  # HF-style {"rope_type": "linear" | "llama3", "factor": ...}

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim rounded up to ``multiple_of``, as in LLaMA."""
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def n_trunk_layers(self) -> int:
        removed = self.n_future - 1 if self.param_matched else 0
        return self.n_layers - 1 - removed

    def validate(self) -> None:
        _positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_future", "max_seq_len")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.kv_heads}")
        if self.n_trunk_layers < 0:
            raise ConfigError(
                f"model.param_matched with n_future={self.n_future} removes {self.n_future - 1} trunk layers, "
                f"but n_layers={self.n_layers} leaves a trunk of only {self.n_layers - 1}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", "default")
            missing = [k for k in ROPE_SCALING_KEYS.get(kind, ()) if k not in self.rope_scaling]
            if kind not in ROPE_SCALING_KEYS or missing:
                raise ConfigError(
                    f"model.rope_scaling={self.rope_scaling!r}: supported are rope_type "
                    + ", ".join(f"{k!r} (with {', '.join(v) or 'nothing else'})" for k, v in ROPE_SCALING_KEYS.items())
                )


# Rotary scalings ``mtp.model.rope_tables`` implements, and the keys each one needs.
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


# Sizes of the paper's scaling grid (LLaMA-style widths) plus tiny CPU presets.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(dim=64, n_layers=3, n_heads=4, max_seq_len=128, multiple_of=32),
    "tiny": dict(dim=128, n_layers=6, n_heads=4, max_seq_len=256),
    "small": dict(dim=256, n_layers=8, n_heads=8, max_seq_len=512),
    "0.3B": dict(dim=1024, n_layers=24, n_heads=16, max_seq_len=2048, multiple_of=256),
    "0.6B": dict(dim=1536, n_layers=21, n_heads=16, max_seq_len=2048, multiple_of=256),
    "1.3B": dict(dim=2048, n_layers=24, n_heads=32, max_seq_len=2048, multiple_of=256),
    "3B": dict(dim=3200, n_layers=26, n_heads=32, max_seq_len=2048, multiple_of=256),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096, multiple_of=256),
}


def preset_shape(name: str) -> dict[str, Any]:
    """The ModelConfig fields of a named preset; an unknown name is a ConfigError listing them."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return dict(MODEL_PRESETS[name])


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a named preset; ``overrides`` win over the preset."""
    cfg = ModelConfig(**{**preset_shape(name), **overrides})
    cfg.validate()
    return cfg


def cache_dir(kind: str) -> Path:
    """``$MTP_CACHE_DIR/<kind>`` (default ``~/.cache/mtp/<kind>``): packed data, downloaded models, task corpora."""
    return Path(os.environ.get("MTP_CACHE_DIR", Path.home() / ".cache" / "mtp")) / kind


# ---------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Where text comes from and how it is cut into training blocks.

    ``source`` is ``stdlib`` (the running interpreter's standard-library sources, the
    embedded default), a local folder of source files, a local json/jsonl/parquet/txt
    file, or a Hugging Face hub dataset name.
    """

    source: str = "stdlib"
    text_column: str = "text"
    split: str = "train"
    file_glob: str = "**/*.py"
    max_documents: int | None = None
    tokenizer: str = "byte"  # "byte", a tokenizer.json path, or "bpe" (trained on the corpus)
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.02
    num_proc: int = 2
    seed: int = 0
    cache_dir: str | None = None
    pack: str = "stream"  # "stream": cut every block; "whole": a document never straddles a block (mtp.packing)
    prompt_column: str | None = None  # with pack=whole: that column's text (a prefix) is input only, never a target

    def validate(self) -> None:
        if self.pack not in ("stream", "whole"):
            raise ConfigError(f"data.pack={self.pack!r} must be 'stream' or 'whole'")
        if self.prompt_column is not None and self.pack != "whole":
            raise ConfigError("data.prompt_column masks the loss per document: it needs data.pack: whole")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _positive(self, "num_proc", "bpe_vocab_size")
        if self.max_documents is not None and self.max_documents <= 0:
            raise ConfigError(f"data.max_documents={self.max_documents} must be positive")


# ------------------------------------------------------------------------ training

# What ``train.freeze`` can hold: the embedding and trunk blocks; head 0's block with the shared
# final norm and unembedding (all that head 0's prediction adds to the trunk).
FREEZABLE = ("trunk", "head0")


SCHEDULES = ("sequential", "batched", "naive")  # mtp.loss says what each does


@dataclass
class TrainConfig:
    """Optimisation and schedule of one training run (per worker batch sizes)."""

    preset: str = "tiny"
    seq_len: int | None = None  # None: the model's max_seq_len
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    head_weights: list[float] | None = None  # per-head loss weights; uniform when None
    head_targets: str = "future"  # "future": head i predicts t+1+i; "next": every head t+1 (a control)
    schedule: str = "sequential"  # "sequential" (memory-efficient), "batched" (heads batched, fused loss) or "naive"
    loss_chunk_size: int | None = 1024  # positions per CE chunk; None = whole sequence
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16", "fp32"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    init_from: str | None = None  # checkpoint or MLflow URI: start from its weights (n_future may differ)
    freeze: list[str] = field(default_factory=list)  # parts not trained: "trunk", "head0" (mtp.model.FREEZABLE)
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    output_dir: str = "runs"

    def validate(self) -> None:
        _positive(self, "batch_size", "grad_accum", "max_steps", "log_every",
                  "eval_every", "eval_batches", "checkpoint_every")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if self.head_targets not in ("future", "next"):
            raise ConfigError(f"train.head_targets={self.head_targets!r} must be 'future' or 'next'")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r} must be one of {', '.join(map(repr, SCHEDULES))}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.dtype={self.dtype!r} must be 'auto', 'bf16' or 'fp32'")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise ConfigError(f"train.loss_chunk_size={self.loss_chunk_size} must be positive or null")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip} must be >= 0")
        unknown = [part for part in self.freeze if part not in FREEZABLE]
        if unknown:
            raise ConfigError(f"train.freeze={self.freeze!r}: unknown parts {unknown}; choose from {', '.join(FREEZABLE)}")
        preset_shape(self.preset)


@dataclass
class ScalingConfig:
    """How many Ray Train workers, on what, sharded how."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    strategy: str = "ddp"  # "ddp" or "fsdp"
    max_failures: int = 0

    def validate(self) -> None:
        _positive(self, "num_workers")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"scaling.strategy={self.strategy!r} must be 'ddp' or 'fsdp'")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.max_failures < 0:
            raise ConfigError("scaling.cpus_per_worker, gpus_per_worker and max_failures must be >= 0")


@dataclass
class TrackingConfig:
    """MLflow: where runs go and under which names."""

    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a local store
    experiment: str = "mtp-train"
    run_name: str | None = None
    registered_model: str | None = "mtp-model"
    run_id: str | None = None  # set by the job; saved in checkpoints so restarts continue the same run

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty")


@dataclass
class JobConfig:
    """Everything one training job needs; the single object handed to workers."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "JobConfig":
        for section in (self.model, self.data, self.train, self.scaling, self.tracking):
            section.validate()
        if self.train.seq_len is None:
            self.train.seq_len = self.model.max_seq_len
        if self.train.seq_len <= 0:
            raise ConfigError(f"train.seq_len={self.train.seq_len} must be positive")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.train.head_weights is not None and len(self.train.head_weights) != self.model.n_future:
            raise ConfigError(
                f"train.head_weights has {len(self.train.head_weights)} entries, "
                f"but model.n_future={self.model.n_future}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.field`` keys, for MLflow params and sweep spaces."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}


# ---------------------------------------------------------------------- building


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{section}.{name}={value!r} must be a positive number")


_SECTIONS = {f.name: f for f in dataclasses.fields(JobConfig)}


def apply_overrides(cfg: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """Set dotted ``section.field`` keys; unknown keys raise a ConfigError naming them."""
    for key, value in overrides.items():
        section_name, _, name = key.partition(".")
        if section_name not in _SECTIONS or not name:
            raise ConfigError(f"{key}: unknown config key; sections are {', '.join(_SECTIONS)}")
        section = getattr(cfg, section_name)
        hints = typing.get_type_hints(type(section))
        if name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"{key}: unknown config key; {section_name} has {known}")
        setattr(section, name, coerce(value, hints[name], key))
    return cfg


def flatten_mapping(data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; a non-mapping section is an error."""
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def read_yaml_mapping(
    path: str | Path, what: str = "config file", error: type[Exception] = ConfigError
) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, invalid or non-mapping file raises ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {str(path)!r} must hold a mapping")
    return data


def build_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> JobConfig:
    """Defaults <- preset <- YAML file <- overrides, then validate.

    The preset named in ``train.preset`` supplies the model shape; explicit
    ``model.*`` keys (from the file or overrides) win over it.
    """
    flat: dict[str, Any] = {}
    if path is not None:
        flat.update(flatten_mapping(read_yaml_mapping(path), where=f"{path}: "))
    flat.update(overrides or {})

    cfg = JobConfig()
    apply_overrides(cfg, {k: v for k, v in flat.items() if k == "train.preset"})
    cfg.model = ModelConfig(**preset_shape(cfg.train.preset))
    apply_overrides(cfg, flat)
    return cfg.validate()


def from_dict(data: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from ``to_dict()`` output (checkpoints, Ray payloads)."""
    cfg = JobConfig()
    apply_overrides(cfg, flatten_mapping(data))
    return cfg.validate()


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    cfg = build(ModelConfig, data, "model")
    cfg.validate()
    return cfg
