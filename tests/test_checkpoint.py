"""Checkpoints round-trip weights, config, tokenizer and resume state exactly."""

import pytest
import torch

from mtp.checkpoint import load_model, load_train_state, save_checkpoint
from mtp.config import ConfigError, JobConfig, build_config, from_dict
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_checkpoint_round_trip(tmp_path):
    cfg = build_config(overrides={"train.preset": "debug", "model.n_future": 2})
    torch.manual_seed(0)
    model = MTPTransformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 260, (1, 8)), all_heads=True).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, cfg, ByteTokenizer(), train_state={"step": 7, "optimizer": opt.state_dict()})
    loaded, tok, config = load_model(tmp_path / "ck")
    assert from_dict(config) == cfg
    assert isinstance(tok, ByteTokenizer)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 260, (2, 16))
    assert torch.equal(model.eval()(x, all_heads=True), loaded(x, all_heads=True))
    state = load_train_state(tmp_path / "ck")
    assert state["step"] == 7
    restored = torch.optim.AdamW(loaded.parameters())
    restored.load_state_dict(state["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_overwriting_a_checkpoint_keeps_one_complete_copy(tmp_path):
    cfg = JobConfig()
    cfg.model = build_config(overrides={"train.preset": "debug"}).model
    model = MTPTransformer(cfg.model)
    for step in range(2):
        save_checkpoint(tmp_path / "latest", model, cfg, ByteTokenizer(), train_state={"step": step})
    assert load_train_state(tmp_path / "latest")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_load_model_names_a_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_model(tmp_path)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' + x\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 260 and tok.eos_id not in tok.encode(text)


def test_bpe_tokenizer_trains_saves_and_loads(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n"] * 50
    tok = HFTokenizer.train_bpe(texts, vocab_size=300)
    ids = tok.encode(texts[0])
    assert len(ids) < len(texts[0]) and tok.decode(ids) == texts[0]
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(texts[0]) == ids


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config(overrides={"train.preset": "huge"})
    with pytest.raises(ConfigError, match="train.lr"):
        build_config(overrides={"train.lr": -1})
    with pytest.raises(ConfigError, match="train.learning_rate: unknown config key"):
        build_config(overrides={"train.learning_rate": 1})
    with pytest.raises(ConfigError, match="model.n_future: expected int, got 'four'"):
        build_config(overrides={"model.n_future": "four"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 0\n")
    with pytest.raises(ConfigError, match="train.max_steps=0"):
        build_config(bad)


def test_yaml_and_overrides_layer_over_the_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  preset: small\n  lr: 0.001\nmodel:\n  n_future: 2\n")
    cfg = build_config(path, {"train.lr": "3e-4"})
    assert cfg.model.dim == 256 and cfg.model.n_future == 2 and cfg.train.lr == 3e-4
