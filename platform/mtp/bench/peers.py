"""The same model in Hugging Face ``transformers``, to time what users would otherwise run.

Head 0 of an MTP model is an ordinary Llama-style next-token model (trunk layers
then head 0's block, shared norm and unembedding), so its weights load into
``LlamaForCausalLM`` unchanged except for one layout detail: ``mtp.model`` rotates
interleaved channel pairs, Llama's ``rotate_half`` rotates the two halves of a
head, so the rows of ``wq``/``wk`` are permuted per head. ``to_llama`` checks that
the logits agree before anything is timed.

``transformers`` is a bench-only extra (``pip install -e .[bench]``), imported here only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from mtp.model import MTPTransformer

LOGITS_ATOL = 1e-4  # fp32; a real layout or config mismatch is off by O(1)


def _halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Output rows of a q/k projection from interleaved rotary pairs to rotate-half order, per head."""
    out, dim = w.shape
    return w.view(heads, out // heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def to_llama(model: MTPTransformer, check_tokens: int = 64):
    """A ``LlamaForCausalLM`` with head 0's weights; raises if its logits differ from the model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    blocks = [*model.trunk_layers, model.heads[0]]
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=len(blocks),
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, bos_token_id=None, eos_token_id=None,
        pad_token_id=0,
    )
    hf = LlamaForCausalLM(config).to(dtype=model.output.weight.dtype, device=model.output.weight.device).eval()
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.output.weight}
    for i, block in enumerate(blocks):
        attention, ff, prefix = block.attention, block.feed_forward, f"model.layers.{i}."
        state.update({
            prefix + "self_attn.q_proj.weight": _halves(attention.wq.weight, cfg.n_heads),
            prefix + "self_attn.k_proj.weight": _halves(attention.wk.weight, cfg.kv_heads),
            prefix + "self_attn.v_proj.weight": attention.wv.weight,
            prefix + "self_attn.o_proj.weight": attention.wo.weight,
            prefix + "mlp.gate_proj.weight": ff.w1.weight,
            prefix + "mlp.up_proj.weight": ff.w3.weight,
            prefix + "mlp.down_proj.weight": ff.w2.weight,
            prefix + "input_layernorm.weight": block.attention_norm.weight,
            prefix + "post_attention_layernorm.weight": block.ffn_norm.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    tokens = torch.randint(0, cfg.vocab_size, (2, min(check_tokens, cfg.max_seq_len)),
                           generator=torch.Generator().manual_seed(0)).to(model.output.weight.device)
    with torch.inference_mode():
        diff = float((hf(tokens).logits.float() - model(tokens).float()).abs().max())
    if not diff <= LOGITS_ATOL:
        raise RuntimeError(f"LlamaForCausalLM logits differ from head 0's by {diff:.3g} (> {LOGITS_ATOL}): "
                           "the weight mapping is wrong, nothing would be comparable")
    return hf


@dataclass
class PeerMethod:
    """One way of generating with ``transformers``: ``generate``'s keyword arguments."""

    name: str
    kwargs: dict
    max_batch_size: int | None = None  # prompt lookup is batch-1 only in transformers


def peer_methods(temperature: float = 0.0, lookup_tokens: int = 10) -> list[PeerMethod]:
    from transformers import CompileConfig

    compiled = CompileConfig(mode="default", dynamic=False)
    compiled._compile_all_devices = True  # generate compiles its forward on CUDA only unless told
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    return [
        PeerMethod("hf_generate", dict(sampling)),
        PeerMethod("hf_static_compile", {**sampling, "cache_implementation": "static", "compile_config": compiled}),
        PeerMethod(f"hf_prompt_lookup{lookup_tokens}", {**sampling, "prompt_lookup_num_tokens": lookup_tokens}, 1),
    ]


@torch.inference_mode()
def hf_generate(hf, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None,
                **kwargs) -> tuple[list[list[int]], float]:
    """Generate for one batch of prompts (left-padded); (tokens per prompt, cut at EOS; seconds)."""
    device = hf.device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p))
        mask[row, width - len(p) :] = 1
    start = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
                      eos_token_id=eos_id, pad_token_id=0, **kwargs)
    seconds = time.perf_counter() - start
    tokens = []
    for row in out[:, width:].tolist():
        tokens.append(row[: row.index(eos_id)] if eos_id in row else row)
    return tokens, seconds
