"""One strict parser for every spec: an unknown key or a wrongly typed value fails naming the key."""

from __future__ import annotations

import pytest
import yaml

from mtp.config import ConfigError, build_config, model_config_from_dict
from mtp.decoding.config import EngineConfig
from mtp.sandbox import Limits
from mtp.serving.config import ServeConfig
from mtp.sweep.evaluation import EvalSpec
from mtp.sweep.scorers import parse_task

SWEEP = {"space": {"model.n_future": {"grid": [1, 2]}}, "metric": "val/bpb",
         "config": {"train": {"preset": "debug", "max_steps": 2}}}
TASK = {"name": "polynomial", "train_problems": 10, "test_problems": 2}


def _sweep_file(tmp_path, **overrides):
    from mtp.sweep.spec import load_spec

    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, **overrides}))
    return lambda: load_spec(path)


@pytest.mark.parametrize("kind, parse, message", [
    ("job config", lambda _: build_config(overrides={"train.foo": 1}), "train.foo: unknown config key"),
    ("job config", lambda _: build_config(overrides={"train.seq_len": "abc"}),
     "train.seq_len: expected int or null, got 'abc'"),
    ("checkpoint model", lambda _: model_config_from_dict({"dim": 64, "width": 3}), "model.width: unknown key"),
    ("sweep file", lambda t: _sweep_file(t, task={**TASK, "params": {"foo": 1}})(),
     "x.yaml: task.params.foo: unknown key"),
    ("sweep file", lambda t: _sweep_file(t, task={**TASK, "params": {"max_ops": "many"}})(),
     "x.yaml: task.params.max_ops: expected int, got 'many'"),
    ("sweep file", lambda t: _sweep_file(t, num_samples=[2])(), "x.yaml: num_samples: expected int, got [2]"),
    ("sweep file", lambda t: _sweep_file(t, scheduler={"type": "asha", "patience": 3})(),
     "x.yaml: scheduler.patience: unknown key"),
    ("sweep file", lambda t: _sweep_file(t, plot={"x": ["a"]})(), "x.yaml: plot.x: expected str, got ['a']"),
    ("evaluation", lambda _: EvalSpec.parse({"k": [1], "temprature": 0.2}), "evaluation.temprature: unknown key"),
    ("evaluation", lambda _: EvalSpec.parse({"k": ["one"]}), "evaluation.k[0]: expected int, got 'one'"),
    ("evaluation", lambda _: EvalSpec.parse({"top_k": "all"}), "evaluation.top_k: expected int or null, got 'all'"),
    ("task", lambda _: parse_task({**TASK, "test_problem": 3}), "task.test_problem: unknown key"),
    ("task", lambda _: parse_task({**TASK, "seed": "zero"}), "task.seed: expected int, got 'zero'"),
    ("speed", lambda _: parse_task({"name": "speed", "promts": 3}), "task.promts: unknown key"),
    ("speed", lambda _: parse_task({"name": "speed", "batch_sizes": 8}), "task.batch_sizes: expected list of int, got 8"),
    ("serve", lambda _: ServeConfig.from_args({"model": "m", "max_tokens": 3}), "serve.max_tokens: unknown key"),
    ("serve", lambda _: ServeConfig.from_args({"model": "m", "request_timeout_s": "soon"}),
     "serve.request_timeout_s: expected float, got 'soon'"),
    ("serve", lambda _: ServeConfig.from_args({"model": "m", "engine": {"tree": [2, "x"]}}),
     "serve.engine.tree[1]: expected int, got 'x'"),
    ("engine", lambda _: EngineConfig.from_dict({"compile": "maybe"}), "engine.compile: expected bool, got 'maybe'"),
    ("sandbox limits", lambda _: Limits.from_dict({"memory": 64}), "limits.memory: unknown key"),
    ("sandbox limits", lambda _: Limits.from_dict({"memory_mb": "lots"}), "limits.memory_mb: expected int, got 'lots'"),
])
def test_unknown_keys_and_wrong_types_fail_naming_the_key(tmp_path, monkeypatch, kind, parse, message):
    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        parse(tmp_path)
    assert message in str(info.value), kind
    assert not (tmp_path / "cache").exists()  # parsing writes nothing


def test_values_keep_their_types_and_strings_convert_as_on_a_command_line():
    cfg = build_config(overrides={"train.lr": "1e-3", "train.seq_len": "64", "train.compile": "true",
                                  "train.head_weights": "[1, 0.5, 0.5, 0.5]", "model.n_kv_heads": None})
    assert (cfg.train.lr, cfg.train.seq_len, cfg.train.compile) == (1e-3, 64, True)
    assert cfg.train.head_weights == [1.0, 0.5, 0.5, 0.5] and cfg.model.n_kv_heads is None
    engine = EngineConfig.from_dict({"tree": [3, 2, 1]})
    assert engine.tree == (3, 2, 1)
    assert Limits.from_dict(Limits(timeout_s=2).to_dict()) == Limits(timeout_s=2)
