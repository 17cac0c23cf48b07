"""Import a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory as an MTP model.

Trunk = every layer but the last, head 0 = the last layer, the shared final norm
and unembedding are the model's; heads 1.. are copies of the last layer (the
paper's n -> n' finetuning starts there too) or freshly initialised. The weights
are read from the memory-mapped safetensors one tensor at a time; the tokenizer is
the model's ``tokenizer.json`` with its own special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mtp.config import ConfigError, ModelConfig
from mtp.importing.layout import block_names, next_token_names, rotary_heads, to_interleaved
from mtp.importing.stream import ConversionError, TensorPlan, safetensors_dtype
from mtp.importing.target import fresh_plan, write_checkpoint
from mtp.tokenizer import HFTokenizer

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
DEFAULT_MAX_SEQ_LEN = 4096  # the decoder's KV cache is sized by it: longer contexts by --max-seq-len
IGNORED = ("rotary_emb.inv_freq",)  # buffers some exports include; recomputed from the config


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return data


def rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(hf.get("rope_scaling") or params)
    kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
    if kind == "default":
        return theta, None
    scaling["rope_type"] = kind
    return theta, scaling


def model_config(hf: dict[str, Any], n_future: int, where: Path, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of an HF config; anything this platform's model cannot run is a ConversionError naming the key."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{where}: architectures={hf.get('architectures')!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise ConversionError(f"{where}: {key!r} is missing or not an integer")
    unsupported = {"hidden_act": (hf.get("hidden_act", "silu"), "silu"), "mlp_bias": (hf.get("mlp_bias", False), False),
                   "use_sliding_window": (hf.get("use_sliding_window", False), False)}
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConversionError(f"{where}: {key}={value!r} is not supported (only {wanted!r})")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, head_dim):
        raise ConversionError(f"{where}: head_dim={hf['head_dim']} is not hidden_size / num_attention_heads = {head_dim}")
    theta, scaling = rope_settings(hf)
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), ffn_hidden=hf["intermediate_size"],
        n_future=n_future, max_seq_len=min(hf.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN), max_seq_len or DEFAULT_MAX_SEQ_LEN),
        rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)),
        attn_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling=scaling,
    )
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConversionError(f"{where}: {exc}") from None
    return cfg


class Safetensors:
    """The tensors of an HF directory (``model.safetensors`` or shards with an index), memory-mapped."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            raise ConversionError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors weights are read; re-save with save_pretrained)")
        self.where: dict[str, Path] = {}
        self.handles = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConversionError(f"{path} is missing (listed in {index.name})")
            try:
                handle = self.handles[path] = safe_open(str(path), "pt")
            except Exception as exc:  # safetensors raises its own error type for a corrupt header
                raise ConversionError(f"{path} is not a safetensors file: {exc}") from None
            for key in handle.keys():
                self.where[key] = path

    def plan(self, ours: str, theirs: str, heads: int | None) -> TensorPlan:
        if theirs not in self.where:
            raise ConversionError(f"no tensor {theirs!r} in {', '.join(str(p) for p in self.handles)} (needed for {ours!r})")
        path = self.where[theirs]
        view = self.handles[path].get_slice(theirs)
        dtype = safetensors_dtype(view.get_dtype(), f"{path}: {theirs!r}")

        def load() -> torch.Tensor:
            tensor = self.handles[path].get_tensor(theirs)
            return to_interleaved(tensor, heads) if heads else tensor

        return TensorPlan(ours, tuple(view.get_shape()), dtype, f"{path}: {theirs!r}", load)


def hf_tokenizer(directory: Path, hf: dict[str, Any]) -> HFTokenizer:
    """The model's ``tokenizer.json`` with its special tokens (tokenizer_config.json, else config.json ids)."""
    from tokenizers import Tokenizer as _Tok

    path = directory / "tokenizer.json"
    if not path.is_file():
        hint = " (a SentencePiece tokenizer.model must be converted to tokenizer.json first)" if (directory / "tokenizer.model").is_file() else ""
        raise ConversionError(f"{path} is missing{hint}")
    try:
        tok = _Tok.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ConversionError(f"{path} is not a tokenizers file: {exc}") from None
    settings = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}

    def special(kind: str) -> int | None:
        token = settings.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
        value = hf.get(f"{kind}_token_id")
        return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

    ids = {kind: special(kind) for kind in ("bos", "eos", "pad", "unk")}
    if ids["eos"] is None:
        raise ConversionError(f"{directory}: no end-of-sequence token (tokenizer_config.json 'eos_token' "
                              "or config.json 'eos_token_id'): generation could never stop")
    return HFTokenizer(tok, {k: ids["eos"] if v is None else v for k, v in ids.items()}, add_special_tokens=True)


def import_hf(
    source: str | Path,
    out: str | Path,
    n_future: int = 4,
    new_heads: str = "copy",
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert the HF model directory ``source`` into an mtp checkpoint at ``out`` with ``n_future`` heads.

    ``new_heads``: ``copy`` (heads 1.. start as the last layer) or ``random``.
    ``dtype`` casts the weights (default: as stored).
    """
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"{source} is not a directory")
    if new_heads not in ("copy", "random"):
        raise ConversionError(f"new_heads={new_heads!r} must be 'copy' or 'random'")
    hf = read_json(source / "config.json")
    cfg = model_config(hf, n_future, source / "config.json", max_seq_len)
    tokenizer = hf_tokenizer(source, hf)
    tensors = Safetensors(source)
    plans = [tensors.plan(ours, theirs, heads) for ours, theirs, heads in next_token_names(cfg)]
    used = {theirs for _, theirs, _ in next_token_names(cfg)}
    unknown = sorted(k for k in tensors.where if k not in used and not k.endswith(IGNORED)
                     and not (k == "lm_head.weight" and cfg.tie_embeddings))
    if unknown:
        raise ConversionError(f"{tensors.where[unknown[0]]}: tensor {unknown[0]!r} has no place in a "
                              f"{hf['architectures'][0]} of this config ({len(unknown)} such)")
    last = cfg.n_layers - 1
    head0 = {p.name: p for p in plans if p.name.startswith("heads.0.")}
    for j in range(1, n_future):
        for name, theirs in block_names(cfg).items():
            if new_heads == "copy":
                plans.append(tensors.plan(f"heads.{j}.{name}", f"model.layers.{last}.{theirs}", rotary_heads(cfg, name)))
            else:
                plans.append(fresh_plan(cfg, f"heads.{j}.{name}", head0[f"heads.0.{name}"].shape, seed))
    provenance = {"source": str(source.resolve()), "format": "hf", "architecture": hf["architectures"][0],
                  "n_future": n_future, "new_heads": new_heads}
    return write_checkpoint(out, cfg, plans, tokenizer, provenance, dtype, overwrite)
