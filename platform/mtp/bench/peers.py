"""The same model in Hugging Face ``transformers``, to time what users would otherwise run.

Head 0 of an MTP model is an ordinary Llama-style next-token model (trunk layers
then head 0's block, shared norm and unembedding); ``mtp.importing.layout`` maps its
weights onto ``LlamaForCausalLM`` (the exporter's mapping). ``to_llama`` checks that
the logits agree before anything is timed.

``transformers`` is a bench-only extra (``pip install -e .[bench]``), imported here only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from mtp.importing.export import hf_config
from mtp.importing.layout import next_token_names, to_halves
from mtp.model import MTPTransformer

LOGITS_ATOL = 1e-4  # fp32; a real layout or config mismatch is off by O(1)


def to_llama(model: MTPTransformer, check_tokens: int = 64):
    """A ``LlamaForCausalLM`` with head 0's weights; raises if its logits differ from the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.cfg
    hf_cfg = hf_config(cfg)
    config = AutoConfig.for_model(hf_cfg.pop("model_type"), **{**hf_cfg, "pad_token_id": 0})
    hf = AutoModelForCausalLM.from_config(config).to(dtype=model.output.weight.dtype, device=model.output.weight.device).eval()
    ours = model.state_dict()
    state = {theirs: to_halves(ours[name], heads) if heads else ours[name] for name, theirs, heads in next_token_names(cfg)}
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
