"""How an engine decodes: one dataclass, reachable from every entry point.

``EngineConfig`` is what ``Engine(model, tokenizer, config)`` takes; the serve config
(``engine:`` in its ``args``), evaluation (``GenerationConfig.engine``, the flags of
``jobs/evaluate.py``) and a sweep file's scorers (an ``engine:`` mapping inside its
``evaluation:`` or ``task:`` section) all carry one. A new
option is a field here, with its ``help``: the command-line flags
(``add_arguments``/``from_args``) and the mapping parser (``from_dict``) are derived
from the fields, so it reaches every entry point without further edits.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mtp.config import ConfigError
from mtp.specs import build

if TYPE_CHECKING:
    import torch

# dtype name -> torch attribute. torch is imported only where a dtype or device is resolved, so
# reading flags and configs (``jobs/evaluate.py --samples`` builds its parser from this class) stays light.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class EngineConfig:
    """Batch size, placement and the decode-step machinery of one engine."""

    max_batch_size: int = field(default=8, metadata={"help": "rows decoded together (the static KV cache's batch)"})
    device: str = field(default="auto", metadata={"help": "auto (a GPU when one is visible, else cpu), cpu, cuda[:N]"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16, fp16"})
    tree: tuple[int, ...] | None = field(default=None, metadata={
        "help": "greedy drafts verify a tree: top tokens per head, e.g. 3 2 1 (default: the chain of all heads)"})
    static_shapes: bool = field(default=False, metadata={
        "help": "every step attends over the whole masked cache: its shapes depend on the batch size only (implied by cuda_graphs)"})
    cuda_graphs: bool = field(default=False, metadata={"help": "capture each step kind and batch size once, replay it"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each step kind (any device)"})

    def __post_init__(self) -> None:
        if self.tree is not None and not isinstance(self.tree, tuple):  # YAML and flags give lists
            object.__setattr__(self, "tree", tuple(self.tree))

    def validate(self) -> "EngineConfig":
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"engine.max_batch_size={self.max_batch_size!r} must be a positive integer")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"engine.device={self.device!r} must be 'auto', 'cpu' or 'cuda[:N]'")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"engine.dtype={self.dtype!r} must be one of auto, {', '.join(DTYPES)}")
        if self.tree is not None and (not self.tree or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                                           for w in self.tree)):
            raise ConfigError(f"engine.tree={self.tree!r} must be a non-empty list of positive integers")
        for name in ("static_shapes", "cuda_graphs", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"engine.{name}={getattr(self, name)!r} must be true or false")
        if self.cuda_graphs and self.compile:
            raise ConfigError("engine: choose one of cuda_graphs and compile")
        return self

    @classmethod
    def matching(cls, model: torch.nn.Module, **options: Any) -> "EngineConfig":
        """A config that leaves ``model`` on its device and in its dtype (for a model already placed)."""
        import torch

        param = next(model.parameters())
        dtype = next(name for name, d in DTYPES.items() if getattr(torch, d) == param.dtype)
        return cls(device=str(param.device), dtype=dtype, **options)

    def torch_device(self) -> torch.device:
        from mtp.device import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """``auto``: bf16 on a GPU, fp32 on a CPU (where bf16 matmuls are slow and greedy ties differ)."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, DTYPES[self.dtype])

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "engine",
                  defaults: "EngineConfig | None" = None) -> "EngineConfig":
        """Build and validate from a mapping (a YAML section) over ``defaults``; unknown keys and
        wrong types fail naming the key."""
        return build(cls, {} if raw is None else raw, where, base=defaults).validate()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tree"] = list(self.tree) if self.tree is not None else None
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, defaults: "EngineConfig | None" = None) -> None:
        """One flag per field (``--max-batch-size``, ``--tree 3 2 1``, ``--compile``, ...), in a group of its own."""
        defaults, hints = defaults or cls(), typing.get_type_hints(cls)
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            flag, default, help_ = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), f.metadata["help"]
            if hints[f.name] is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            elif f.name == "tree":
                group.add_argument(flag, type=int, nargs="+", default=default, help=help_)
            else:
                group.add_argument(flag, type=hints[f.name], default=default, help=help_ + " (default %(default)s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineConfig":
        try:
            return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}).validate()
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
