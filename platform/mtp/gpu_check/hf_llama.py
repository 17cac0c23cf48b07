"""The peer users would otherwise pick: our head-0 weights in ``transformers``' Llama.

Trunk blocks plus head 0 are exactly a Llama decoder (RMSNorm, rotary attention,
SwiGLU, untied unembedding). One layout differs: ``mtp.model.apply_rope`` rotates
adjacent channel pairs (2i, 2i+1), while Llama's ``rotate_half`` pairs channel i with
i + head_dim/2 at the same frequency. Reordering the rows of ``wq`` and ``wk`` within
each head (evens first, then odds) maps one onto the other; attention scores are
unchanged, since q and k are permuted alike. ``logit_error`` checks the mapping.
"""

from __future__ import annotations

import time

import torch

from mtp.model import MTPTransformer


def rotary_rows(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved rotary pairs to Llama's half-split layout."""
    return weight.reshape(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(heads * head_dim, -1)


def llama_from_mtp(model: MTPTransformer):
    """A ``LlamaForCausalLM`` computing ``model``'s head-0 logits, on the same device and dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    blocks = [*model.trunk_layers, model.heads[0]]
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=len(blocks), num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    state = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.output.weight,
    }
    for i, b in enumerate(blocks):
        att, ffn, p = b.attention, b.feed_forward, f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": rotary_rows(att.wq.weight, cfg.n_heads, cfg.head_dim),
            p + "self_attn.k_proj.weight": rotary_rows(att.wk.weight, cfg.kv_heads, cfg.head_dim),
            p + "self_attn.v_proj.weight": att.wv.weight,
            p + "self_attn.o_proj.weight": att.wo.weight,
            p + "mlp.gate_proj.weight": ffn.w1.weight,
            p + "mlp.up_proj.weight": ffn.w3.weight,
            p + "mlp.down_proj.weight": ffn.w2.weight,
            p + "input_layernorm.weight": b.attention_norm.weight,
            p + "post_attention_layernorm.weight": b.ffn_norm.weight,
        }
    param = next(model.parameters())
    with torch.device(param.device):
        llama = LlamaForCausalLM(config).to(param.dtype)
    llama.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    return llama.eval()


@torch.inference_mode()
def logit_error(model: MTPTransformer, llama, tokens: torch.Tensor) -> float:
    """``|ours - llama| / |llama|`` of the head-0 logits over ``tokens [B, T]``."""
    ours = model(tokens).float()
    theirs = llama(tokens).logits.float()
    return float((ours - theirs).norm() / theirs.norm())


@torch.inference_mode()
def generate_seconds(llama, prompts: torch.Tensor, new_tokens: int) -> float:
    """Wall time of ``generate``: greedy, exactly ``new_tokens`` each, static cache (which
    ``transformers`` compiles on CUDA by itself)."""
    device = prompts.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    llama.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, cache_implementation="static", pad_token_id=0,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
