"""How an mtp model's tensors are named and laid out in Hugging Face's Llama/Qwen2 format.

Head 0 of an MTP model is an ordinary Llama-style next-token model: HF layer ``i``
is trunk layer ``i`` for ``i < L - 1`` and head 0 for ``i = L - 1``. One layout
detail differs: ``mtp.model`` rotates interleaved channel pairs, HF's
``rotate_half`` the two halves of a head, so the rows of the q/k projections (and
their biases) are permuted per head on the way in and back on the way out.
Used by the importer, the exporter and ``mtp.decoding.peers``.
"""

from __future__ import annotations

from typing import Iterator

import torch

from mtp.config import ModelConfig

# mtp name inside a block -> HF name inside ``model.layers.{i}``
BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
BIASES = {
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
}
GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def block_names(cfg: ModelConfig) -> dict[str, str]:
    """mtp -> HF names of one block's tensors for this config (q/k/v biases when it has them)."""
    return {**BLOCK, **(BIASES if cfg.attn_bias else {})}


def rotary_heads(cfg: ModelConfig, name: str) -> int | None:
    """How many heads a block tensor's rows are split into for rotary, or None if it is not rotated."""
    if name.startswith("attention.wq."):
        return cfg.n_heads
    if name.startswith("attention.wk."):
        return cfg.kv_heads
    return None


def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (dim 0) of a q/k projection or bias from HF's rotate-half order to interleaved pairs, per head."""
    return w.reshape(heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``to_interleaved``: interleaved rotary pairs to HF's rotate-half order."""
    return w.reshape(heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def next_token_names(cfg: ModelConfig) -> Iterator[tuple[str, str, int | None]]:
    """(mtp name, HF name, rotary heads or None) of every tensor of the next-token model (trunk + head 0)."""
    for ours, theirs in GLOBAL.items():
        if not (ours == "output.weight" and cfg.tie_embeddings):
            yield ours, theirs, None
    blocks = [f"trunk_layers.{i}" for i in range(cfg.n_trunk_layers)] + ["heads.0"]
    for i, prefix in enumerate(blocks):
        for ours, theirs in block_names(cfg).items():
            yield f"{prefix}.{ours}", f"model.layers.{i}.{theirs}", rotary_heads(cfg, ours)
