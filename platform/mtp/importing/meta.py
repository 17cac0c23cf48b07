"""Import Meta's released multi-token-prediction checkpoints (``7B_200B_4`` and kin).

Their layout (Llama's reference code plus MTP): ``params.json`` with
``n_future_tokens``; ``consolidated.NN.pth`` model-parallel shards holding
``tok_embeddings``, ``layers.{i}`` (the trunk, then head 0 as the last of them),
``extra_heads.{j}`` (heads 1..n-1), ``norm`` and ``output``. Llama's reference
code rotates interleaved pairs, as ``mtp.model`` does, so no tensor is permuted;
shards are concatenated along the dimension each layer was split on. The files are
loaded with ``torch.load(weights_only=True, mmap=True)``: only plain tensors are
accepted and nothing is read until written out.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from mtp.config import ConfigError, ModelConfig
from mtp.importing.hf import read_json
from mtp.importing.stream import ConversionError, TensorPlan
from mtp.importing.target import fresh_plan, write_checkpoint
from mtp.tokenizer import Tokenizer

# Model-parallel split dimension of each tensor kind (fairscale's Column/RowParallelLinear, ParallelEmbedding).
SPLIT_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
IGNORED = ("rope.freqs",)


def _split_dim(name: str) -> int | None:
    """The shard dimension of ``name``, None for replicated tensors (norms)."""
    for part in reversed(name.split(".")[:-1]):
        if part in SPLIT_DIM:
            return SPLIT_DIM[part]
    return None


def load_shards(directory: Path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """Every ``consolidated.*.pth``, memory-mapped; anything but a mapping of names to tensors is an error."""
    paths = sorted(directory.glob("consolidated.*.pth"))
    if not paths:
        raise ConversionError(f"{directory}: no consolidated.*.pth files")
    shards = []
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise ConversionError(f"{path} holds more than plain tensors (refused by weights_only loading): "
                                  f"{str(exc).splitlines()[0]}") from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise ConversionError(f"{path} is not a PyTorch checkpoint: {exc}") from None
        if not isinstance(state, dict):
            raise ConversionError(f"{path} holds a {type(state).__name__}, not a mapping of names to tensors")
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        shards.append((path, state))
    names = set(shards[0][1])
    for path, state in shards[1:]:
        if set(state) != names:
            raise ConversionError(f"{path}: holds other tensors than {shards[0][0].name} "
                                  f"(e.g. {sorted(set(state) ^ names)[:3]})")
    return shards


def merged_plan(ours: str, theirs: str, shards: list[tuple[Path, dict[str, torch.Tensor]]]) -> TensorPlan:
    """One tensor of the source, concatenated across model-parallel shards along its split dimension."""
    first_path, first = shards[0]
    if theirs not in first:
        raise ConversionError(f"{first_path}: no tensor {theirs!r} (needed for {ours!r})")
    dim = _split_dim(theirs) if len(shards) > 1 else None
    parts = [state[theirs] for _, state in shards]
    shape = list(parts[0].shape)
    if dim is not None:
        shape[dim] = sum(p.shape[dim] for p in parts)
    source = f"{first_path}{f' (+{len(shards) - 1} shards)' if len(shards) > 1 else ''}: {theirs!r}"
    if not parts[0].dtype.is_floating_point:
        raise ConversionError(f"{source} has dtype {parts[0].dtype}, not a floating-point type")

    def load() -> torch.Tensor:
        return torch.cat(parts, dim) if dim is not None else parts[0]

    return TensorPlan(ours, tuple(shape), parts[0].dtype, source, load)


def model_config(params: dict[str, Any], shards, n_future: int, where: Path, max_seq_len: int) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, trunk+head-0 layers in the file, extra heads in the file)."""
    names = shards[0][1]
    layers = 1 + max((int(m.group(1)) for k in names if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    extra = 1 + max((int(m.group(1)) for k in names if (m := re.match(r"extra_heads\.(\d+)\.", k))), default=-1)
    source_future = int(params.get("n_future_tokens", 1))
    if extra != source_future - 1:
        raise ConversionError(f"{where}: n_future_tokens={source_future}, but the checkpoint has {extra} extra_heads")
    for key in ("dim", "n_heads", "n_layers"):
        if not isinstance(params.get(key), int):
            raise ConversionError(f"{where}: {key!r} is missing or not an integer")
    if layers < 1 or params["n_layers"] not in (layers, layers + extra):
        raise ConversionError(f"{where}: n_layers={params['n_layers']} does not fit the {layers} layers "
                              f"+ {extra} extra_heads in the checkpoint")
    embedding = merged_plan("tok_embeddings.weight", "tok_embeddings.weight", shards)
    w1 = merged_plan("w1", f"layers.{layers - 1}.feed_forward.w1.weight", shards)
    cfg = ModelConfig(
        vocab_size=embedding.shape[0], dim=params["dim"], n_layers=layers, n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), ffn_hidden=w1.shape[0], n_future=n_future, max_seq_len=max_seq_len,
        rope_theta=float(params.get("rope_theta", 10000.0)), norm_eps=float(params.get("norm_eps", 1e-5)),
    )
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConversionError(f"{where}: {exc}") from None
    return cfg, layers, extra


def import_meta(
    source: str | Path,
    out: str | Path,
    n_future: int | None = None,
    tokenizer: Tokenizer | None = None,
    new_heads: str = "copy",
    max_seq_len: int = 4096,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert a Meta MTP checkpoint directory into an mtp checkpoint with ``n_future`` heads
    (default: the checkpoint's ``n_future_tokens``; fewer drop heads, more add copies of head 0
    or fresh ones). ``tokenizer`` defaults to ``tokenizer.json`` in ``source`` (Meta's
    SentencePiece ``tokenizer.model`` is not read: see the README).
    """
    from mtp.importing.hf import hf_tokenizer

    source = Path(source)
    params_path = source / "params.json"
    params = read_json(params_path)
    shards = load_shards(source)
    n_future = n_future or int(params.get("n_future_tokens", 1))
    cfg, layers, extra = model_config(params, shards, n_future, params_path, max_seq_len)
    if tokenizer is None:
        tokenizer = hf_tokenizer(source, {})
    used: set[str] = set()

    def take(ours: str, theirs: str) -> TensorPlan:
        used.add(theirs)
        return merged_plan(ours, theirs, shards)

    plans = [take(n, n) for n in ("tok_embeddings.weight", "norm.weight", "output.weight")]
    block = [k.removeprefix(f"layers.{layers - 1}.") for k in shards[0][1] if k.startswith(f"layers.{layers - 1}.")]
    for i in range(layers - 1):
        plans += [take(f"trunk_layers.{i}.{k}", f"layers.{i}.{k}") for k in block]
    heads = [f"layers.{layers - 1}"] + [f"extra_heads.{j}" for j in range(extra)]
    for j in range(n_future):
        if j < len(heads) or new_heads == "copy":
            plans += [take(f"heads.{j}.{k}", f"{heads[j] if j < len(heads) else heads[0]}.{k}") for k in block]
        else:
            plans += [fresh_plan(cfg, f"heads.{j}.{k}", merged_plan(k, f"{heads[0]}.{k}", shards).shape, seed)
                      for k in block]
    dropped = tuple(f"{h}." for h in heads[n_future:])
    unknown = sorted(k for k in shards[0][1] if k not in used and k not in IGNORED and not k.startswith(dropped))
    if unknown:
        raise ConversionError(f"{shards[0][0]}: tensor {unknown[0]!r} has no place in the model ({len(unknown)} such)")
    provenance = {"source": str(source.resolve()), "format": "meta", "n_future_tokens": extra + 1,
                  "n_future": n_future, "new_heads": new_heads, "dropped_heads": list(range(n_future, extra + 1))}
    return write_checkpoint(out, cfg, plans, tokenizer, provenance, dtype, overwrite)
