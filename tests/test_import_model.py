"""Bring your own model: HF and Meta checkpoints in, HF out, against independent forwards.

Small random models are built with ``transformers`` and saved with ``save_pretrained``
(nothing is downloaded); Meta's layout is written here tensor by tensor and checked
against a forward of that layout written in this file.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mtp.checkpoint import load_model  # noqa: E402
from mtp.importing.export import export_hf  # noqa: E402
from mtp.importing.hf import import_hf  # noqa: E402
from mtp.importing.meta import import_meta  # noqa: E402
from mtp.importing.stream import ConversionError  # noqa: E402
from _hf import hf_model, save_hf, write_tokenizer  # noqa: E402

ATOL = 1e-5
TOKENS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_head0_logits_equal_hf(tmp_path, kind):
    hf = hf_model(kind)
    out = import_hf(save_hf(hf, tmp_path / "hf"), tmp_path / "mtp", n_future=3)
    model, tokenizer, config = load_model(out)
    assert model.cfg.n_future == 3 and model.cfg.attn_bias == (kind == "qwen2")
    assert model.cfg.tie_embeddings == (kind == "qwen2") and model.cfg.kv_heads == 2
    with torch.no_grad():
        expected = hf(TOKENS).logits
        logits = model(TOKENS, all_heads=True)
    assert (logits[0] - expected).abs().max() < ATOL
    # the new heads start as copies of the last layer: every head predicts what head 0 does
    assert (logits - expected).abs().max() < ATOL
    assert tokenizer.eos_id == tokenizer._tok.token_to_id("</s>") and tokenizer.encode("def f")


def test_random_new_heads_and_round_trip_export(tmp_path):
    hf = hf_model("llama")
    out = import_hf(save_hf(hf, tmp_path / "hf"), tmp_path / "mtp", n_future=2, new_heads="random")
    model, _, _ = load_model(out)
    assert not torch.equal(model.heads[1].attention.wq.weight, model.heads[0].attention.wq.weight)
    exported = export_hf(out, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert (back(TOKENS).logits - hf(TOKENS).logits).abs().max() < ATOL
    for name, tensor in hf.state_dict().items():  # the same tensors, bit for bit
        assert torch.equal(back.state_dict()[name], tensor), name
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert tok.eos_token == "</s>"


# ------------------------------------------------------------------ Meta's layout

META_PARAMS = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "multiple_of": 32,
               "norm_eps": 1e-5, "rope_theta": 10000.0, "n_future_tokens": 3}


def meta_state(params: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Meta's MTP layout: layers.{0..L-1} (the last is head 0), extra_heads.{0..n-2}."""
    g = torch.Generator().manual_seed(seed)
    dim, hd = params["dim"], params["dim"] // params["n_heads"]
    kv, hidden = params["n_kv_heads"] * hd, 96
    shapes = {"attention.wq.weight": (dim, dim), "attention.wk.weight": (kv, dim), "attention.wv.weight": (kv, dim),
              "attention.wo.weight": (dim, dim), "feed_forward.w1.weight": (hidden, dim),
              "feed_forward.w3.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
              "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    n_extra = params["n_future_tokens"] - 1
    blocks = [f"layers.{i}" for i in range(params["n_layers"] - n_extra)] + [f"extra_heads.{j}" for j in range(n_extra)]
    state = {"tok_embeddings.weight": torch.randn(params["vocab_size"], dim, generator=g),
             "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
             "output.weight": torch.randn(params["vocab_size"], dim, generator=g) * 0.1}
    for b in blocks:
        for k, shape in shapes.items():
            scale = 0.1 if len(shape) == 1 else 1 / math.sqrt(shape[1])
            state[f"{b}.{k}"] = (1.0 if len(shape) == 1 else 0.0) + scale * torch.randn(*shape, generator=g)
    return state


def meta_forward(state: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Every head's logits ``[n, B, T, V]``, written after Llama's reference code (complex rotary, repeat_kv)."""
    B, T = tokens.shape
    H, KV = params["n_heads"], params["n_kv_heads"]
    hd, eps = params["dim"] // H, params["norm_eps"]
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotary(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None]).flatten(3)

    def block(prefix, x):
        p = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")}
        h = rms(x, p["attention_norm.weight"])
        q = rotary((h @ p["attention.wq.weight"].T).view(B, T, H, hd))
        k = rotary((h @ p["attention.wk.weight"].T).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
        v = (h @ p["attention.wv.weight"].T).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / math.sqrt(hd)
        scores = scores + torch.full((T, T), float("-inf")).triu(1)
        out = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)
        x = x + out @ p["attention.wo.weight"].T
        h = rms(x, p["ffn_norm.weight"])
        gate = h @ p["feed_forward.w1.weight"].T
        return x + (gate * torch.sigmoid(gate) * (h @ p["feed_forward.w3.weight"].T)) @ p["feed_forward.w2.weight"].T

    n_extra = params["n_future_tokens"] - 1
    layers = params["n_layers"] - n_extra
    h = state["tok_embeddings.weight"][tokens]
    for i in range(layers - 1):
        h = block(f"layers.{i}", h)
    heads = [f"layers.{layers - 1}"] + [f"extra_heads.{j}" for j in range(n_extra)]
    return torch.stack([rms(block(name, h), state["norm.weight"]) @ state["output.weight"].T for name in heads])


SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def write_meta(directory: Path, state: dict, params: dict, shards: int = 1) -> Path:
    """``params.json`` + ``consolidated.NN.pth`` split as fairscale's model-parallel layers split them."""
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(params))
    for s in range(shards):
        part = {}
        for name, t in state.items():
            kind = name.split(".")[-2]
            dim = SPLIT.get(kind if kind in SPLIT else name.split(".")[0])
            part[name] = t.chunk(shards, dim)[s].clone() if dim is not None and t.dim() > 1 else t.clone()
        torch.save(part, directory / f"consolidated.{s:02d}.pth")
    write_tokenizer(directory)
    return directory


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_all_heads(tmp_path, shards):
    state = meta_state(META_PARAMS)
    src = write_meta(tmp_path / "meta", state, META_PARAMS, shards)
    out = import_meta(src, tmp_path / "mtp")
    model, _, _ = load_model(out)
    assert (model.cfg.n_future, model.cfg.n_trunk_layers, model.cfg.kv_heads) == (3, 1, 2)
    with torch.no_grad():
        ours = model(TOKENS, all_heads=True)
    expected = meta_forward(state, META_PARAMS, TOKENS)
    assert (ours - expected).abs().max() < 1e-4 * expected.abs().max()


def test_meta_fewer_heads_drop_the_rest(tmp_path):
    state = meta_state(META_PARAMS)
    out = import_meta(write_meta(tmp_path / "meta", state, META_PARAMS), tmp_path / "mtp", n_future=1)
    model, _, _ = load_model(out)
    with torch.no_grad():
        assert (model(TOKENS) - meta_forward(state, META_PARAMS, TOKENS)[0]).abs().max() < 1e-3


# ------------------------------------------------------------------ bad inputs


class NotATensor:
    pass


def _fails(fn, *patterns: str, out: Path) -> None:
    with pytest.raises(ConversionError) as info:
        fn()
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "a failed import left files behind"


def test_bad_inputs_name_the_file_and_key_and_write_nothing(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    out = tmp_path / "mtp"
    config = json.loads((src / "config.json").read_text())
    _fails(lambda: import_hf(tmp_path / "nowhere", out), "nowhere", out=out)

    (src / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    _fails(lambda: import_hf(src, out), "config.json", "architectures", "GPT2LMHeadModel", out=out)

    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    _fails(lambda: import_hf(src, out), "model.safetensors", "mlp.gate_proj.weight", "[96, 64]", "[128, 64]", out=out)

    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").rename(src / "weights.bak")
    _fails(lambda: import_hf(src, out), "model.safetensors", out=out)
    (src / "weights.bak").rename(src / "model.safetensors")
    (src / "tokenizer.json").unlink()
    _fails(lambda: import_hf(src, out), "tokenizer.json", out=out)

    meta = write_meta(tmp_path / "meta", meta_state(META_PARAMS), META_PARAMS)
    torch.save({"tok_embeddings.weight": torch.zeros(2), "extra": NotATensor()}, meta / "consolidated.00.pth")
    _fails(lambda: import_meta(meta, out), "consolidated.00.pth", "plain tensors", out=out)
    torch.save({"tok_embeddings.weight": torch.zeros(2), "layers.0.count": 3}, meta / "consolidated.00.pth")
    _fails(lambda: import_meta(meta, out), "consolidated.00.pth", "'layers.0.count'", out=out)
    (meta / "params.json").unlink()
    _fails(lambda: import_meta(meta, out), "params.json", out=out)


# ------------------------------------------------------------------ training the heads


def test_heads_only_training_leaves_trunk_and_head0_bit_identical(tmp_path):
    """An imported Qwen2 (biases, tied embeddings) trains heads 1.. only: every other tensor is unchanged,
    and the trunk runs no backward (its parameters never get a gradient)."""
    from _jobs import tiny_config
    from mtp.train import train

    src = import_hf(save_hf(hf_model("qwen2"), tmp_path / "hf"), tmp_path / "imported", n_future=3)
    cfg = tiny_config(tmp_path, **{"train.init_from": str(src), "train.freeze": "[trunk, head0]", "model.n_future": 3,
                                   "train.max_steps": 3, "train.checkpoint_every": 3, "train.lr": 1e-2})
    result = train(cfg)
    before, _, _ = load_model(src)
    after, tokenizer, config = load_model(result.checkpoint)
    assert config["data"]["tokenizer"] == str(src / "tokenizer.json") and config["model"]["attn_bias"]
    assert tokenizer.eos_id == tokenizer._tok.token_to_id("</s>")
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.startswith(("heads.1.", "heads.2.")) for k in changed), changed


def test_frozen_trunk_gets_no_backward():
    from mtp.config import model_preset
    from mtp.loss import mtp_targets, sequential_backward
    from mtp.model import MTPTransformer, freeze_

    model = MTPTransformer(model_preset("debug", n_future=3))
    freeze_(model, ["trunk", "head0"])
    inputs, targets = mtp_targets(torch.randint(0, 260, (2, 33)), 3)
    sequential_backward(model, inputs, targets, chunk_size=16)
    grads = {name: p.grad is not None for name, p in model.named_parameters()}
    assert all(grads[k] for k in grads if k.startswith(("heads.1.", "heads.2.")))
    assert not any(grads[k] for k in grads if not k.startswith(("heads.1.", "heads.2.")))


def test_end_to_end_heads_on_an_exported_model(tmp_path):
    """Platform n=1 model -> HF -> imported with n=3 -> heads trained alone: greedy output stays the base
    model's at every stage, and the trained heads get drafts accepted (untrained copies barely do)."""
    from _jobs import write_corpus
    from mtp.bench.byom import ByomSettings, run_byom

    s = ByomSettings(preset="debug", source=str(write_corpus(tmp_path / "corpus")), vocab=300, max_documents=None,
                     seq_len=64, batch_size=8, base_steps=30, head_steps=30, n_future=3, prompts=3, prompt_tokens=24,
                     new_tokens=24, lr=1e-2)
    result = run_byom(tmp_path, s)
    assert all(result["greedy_identical"].values()), result["greedy_identical"]
    assert result["trunk_and_head0_bit_identical"]
    decoding = result["decoding"]
    assert decoding["heads trained"]["tokens_per_forward"] > decoding["imported (heads = copies)"]["tokens_per_forward"]


def test_engine_decodes_an_imported_model_exactly(tmp_path):
    """The packed decoder runs Qwen2's q/k/v biases and tied unembedding: its greedy tokens equal HF's,
    self-speculative (heads copied, so drafts are accepted) as plain, and text prompts/stops use the
    model's own tokenizer."""
    from mtp.decoding.api import SamplingParams
    from mtp.decoding.config import EngineConfig
    from mtp.decoding.engine import Engine

    hf = hf_model("qwen2")
    model, tokenizer, _ = load_model(import_hf(save_hf(hf, tmp_path / "hf"), tmp_path / "mtp", n_future=3))
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=2, device="cpu"))
    prompts = [TOKENS[0, :12].tolist(), TOKENS[1, :7].tolist()]
    plain = engine.generate_ids(prompts, SamplingParams(max_new_tokens=10, speculative=False))
    fast = engine.generate_ids(prompts, SamplingParams(max_new_tokens=10))
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=10)[0, len(p):].tolist() for p in prompts]
    assert [g.tokens for g in plain] == [g.tokens for g in fast] == expected
    assert all(g.stats.tokens_per_forward > 2 for g in fast)  # copies of head 0 draft what it then verifies
    text = engine.generate(["def add(a, b):"], SamplingParams(max_new_tokens=8, stop=["\n"]))[0]
    assert "\n" not in text.text and text.prompt_tokens == tokenizer.encode("def add(a, b):")
