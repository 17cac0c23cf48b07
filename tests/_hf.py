"""Small random Hugging Face models (built with ``transformers``, nothing downloaded) and a BPE
tokenizer trained here: the bring-your-own-model tests' sources."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "class A:\n    pass\n"] * 4


def write_tokenizer(directory: Path, vocab_size: int = 120) -> None:
    """A small BPE ``tokenizer.json`` with Llama-style specials, and the tokenizer_config.json naming them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def hf_model(kind: str, **overrides):
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if kind == "llama":
        config = transformers.LlamaConfig(**{**common, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **overrides})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: random ones test their mapping
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory
