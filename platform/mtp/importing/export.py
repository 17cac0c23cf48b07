"""Export trunk + head 0 of an mtp checkpoint as a Hugging Face model directory.

The result is a plain ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when the model has
q/k/v biases) that ``from_pretrained`` loads, with the tokenizer when the model has
a ``tokenizer.json`` (a byte-level model's tokenizer has no HF equivalent: only the
weights are exported). The extra heads are not part of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mtp.checkpoint import WEIGHTS, model_config
from mtp.config import ModelConfig
from mtp.importing.layout import next_token_names, to_halves
from mtp.importing.stream import ConversionError, TensorPlan, atomic_directory, safetensors_dtype, write_safetensors
from mtp.tokenizer import HFTokenizer, Tokenizer, load_tokenizer


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF ``config.json`` of the next-token model (head 0) of ``cfg``."""
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if cfg.attn_bias else ("LlamaForCausalLM", "llama")
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    config = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_trunk_layers + 1,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
        "attention_bias": cfg.attn_bias, "dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return config


def export_hf(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``checkpoint``'s next-token model to the HF directory ``out`` (streamed, atomic)."""
    from safetensors import safe_open

    directory = Path(checkpoint)
    cfg = model_config(directory)
    tokenizer = load_tokenizer(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ConversionError(f"{weights} is missing")
    handle = safe_open(str(weights), "pt")
    stored = set(handle.keys())
    plans = []
    for ours, theirs, heads in next_token_names(cfg):
        if ours not in stored:
            raise ConversionError(f"{weights}: no tensor {ours!r}")
        view = handle.get_slice(ours)

        def load(ours: str = ours, heads: int | None = heads) -> torch.Tensor:
            tensor = handle.get_tensor(ours)
            return to_halves(tensor, heads) if heads else tensor

        plans.append(TensorPlan(theirs, tuple(view.get_shape()), safetensors_dtype(view.get_dtype(), f"{weights}: {ours!r}"),
                                f"{weights}: {ours!r}", load))
    out_dtype = dtype or plans[0].dtype
    with atomic_directory(out, overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", plans, dtype)
        hf_tok = tokenizer if isinstance(tokenizer, HFTokenizer) else None
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, hf_tok, out_dtype), indent=2))
        if hf_tok is not None:
            hf_tok.save(tmp)
            (tmp / "tokenizer_meta.json").unlink()  # mtp's own file; HF reads tokenizer_config.json
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast",
                 **{f"{kind}_token": token for kind, token in hf_tok.special_tokens().items()}}, indent=2))
    return Path(out)
