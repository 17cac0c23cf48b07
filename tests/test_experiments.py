"""Reproduction tasks: generators are deterministic, splits disjoint, answers correct; engine scoring."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from numpy.polynomial import Polynomial

from mtp.config import ConfigError, model_preset
from mtp.decoding import Engine, EngineConfig
from mtp.tasks import polynomial, splits, stargraph
from mtp.tasks.scoring import score
from mtp.tasks.spec import TASKS, TaskError, TaskSpec, problem_key
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer


def numpy_evaluate(expression: str) -> list[int]:
    """Independent reference: numpy polynomials, reduced mod 7 and mod X^5 after every operation."""
    def reduce(p: Polynomial) -> Polynomial:
        coef = np.round(p.coef[:5]).astype(np.int64) % 7
        return Polynomial(coef.astype(float))

    def parse(i: int) -> tuple[Polynomial, int]:
        s = expression[i]
        if s == "x":
            return Polynomial([0.0, 1.0]), i + 1
        if s.isdigit():
            return Polynomial([float(s)]), i + 1
        if s == "~":
            p, j = parse(i + 1)
            return reduce(-p), j
        p, j = parse(i + 1)
        q, k = parse(j)
        if s == "+":
            return reduce(p + q), k
        if s == "*":
            return reduce(p * q), k
        return reduce(p(q)), k  # composition: numpy substitutes q into p

    value, end = parse(0)
    assert end == len(expression)
    return [int(c) for c in np.pad(value.coef, (0, 5))[:5]]


def spec(name: str, **kw) -> TaskSpec:
    return TaskSpec.parse({"name": name, "train_problems": 300, "test_problems": 100, **kw})


def test_polynomial_answers_match_numpy():
    rng = __import__("random").Random(7)
    for _ in range(400):
        expression = polynomial.random_expression(rng, rng.randint(0, 10))
        assert [int(c) for c in polynomial.problem(expression).answer] == numpy_evaluate(expression), expression


def test_polynomial_known_values():
    assert polynomial.problem("*+x3~x").answer == "04600"  # (X+3)(-X) = 4X + 6X^2 mod 7
    assert polynomial.problem("o*xxx").answer == "00100"   # (X^2)(X)
    assert polynomial.problem("o*xx*xx").answer == "00001"  # (X^2)^2 = X^4
    with pytest.raises(ValueError, match="trailing"):
        polynomial.evaluate("xx")


def test_polynomial_operation_counts():
    t = spec("polynomial")
    count = lambda p: sum(c in "~+*o" for c in p.prompt)
    sets = t.eval_sets()
    assert all(1 <= count(p) <= 5 for p in sets["in_domain"])
    assert all(6 <= count(p) <= 10 for p in sets["out_of_domain"])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic(name):
    a, b = spec(name), spec(name)
    assert [p.text for p in a.problems("train", 200)] == [p.text for p in b.problems("train", 200)]
    assert a.eval_sets() == b.eval_sets()
    other = spec(name, seed=1)
    assert [p.text for p in other.problems("train", 200)] != [p.text for p in a.problems("train", 200)]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint(name):
    t = spec(name)
    keys = {s: {problem_key(p) for p in t.problems(s, 300)} for s in splits.SPLITS}
    for eval_set in t.definition.evals:
        keys["test"] |= {problem_key(p) for p in t.problems("test", 100, eval_set)}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    for split, members in keys.items():
        assert all(splits.split_of(k) == split for k in members)
    # a different seed draws other problems, never another split's
    assert all(splits.split_of(problem_key(p)) == "train" for p in spec(name, seed=5).problems("train", 300))


def test_stargraph_paths_are_correct():
    t = spec("stargraph", params={"degree": 3, "arm_length": 4})
    for p in t.problems("train", 200):
        edges = p.prompt.split("|")[0].split(",")
        assert len(edges) == 12 and len(set("".join(edges))) == 13
        assert stargraph.solve(p.prompt) == p.answer
        assert p.answer[0] == p.prompt[-3] and p.answer[-1] == p.prompt[-2]


def test_induction_answer_is_the_earlier_names_second_byte():
    t = spec("induction")
    for p in t.problems("train", 200):
        first = p.prompt[-1]
        earlier = re.findall(rf"{first}([a-z])", p.prompt[:-1])
        assert earlier and set(earlier) == {p.answer}
        assert p.text.startswith(p.prompt + p.answer)


def test_induction_short_templates_are_denser_and_checked():
    params = {"n_names": 3, "n_sentences": 8, "templates": "short"}
    t = spec("induction", params=params)
    problems = t.problems("train", 200)
    for p in problems:
        first = p.prompt[-1]
        earlier = re.findall(rf"{first}([a-z])", p.prompt[:-1])
        assert earlier and set(earlier) == {p.answer}
        assert len(p.text) < 128  # one story fits the sweep's context
    assert problems == spec("induction", params=params).problems("train", 200)  # deterministic
    assert t.corpus_path() != spec("induction", params={"n_names": 3, "n_sentences": 8}).corpus_path()
    with pytest.raises(TaskError, match="templates"):
        TaskSpec.parse({"name": "induction", "params": {"templates": "poems"}})


def test_task_spec_errors_name_the_key():
    with pytest.raises(TaskError, match="task.name"):
        TaskSpec.parse({"name": "chess"})
    with pytest.raises(ConfigError, match="task.params.depth: unknown key"):
        TaskSpec.parse({"name": "stargraph", "params": {"depth": 3}})
    with pytest.raises(TaskError, match="node labels"):
        TaskSpec.parse({"name": "stargraph", "params": {"degree": 20, "arm_length": 5}})
    with pytest.raises(TaskError, match="train_problems"):
        TaskSpec.parse({"name": "polynomial", "train_problems": 0})


def test_engine_section_reaches_every_scorer():
    """An ``engine:`` mapping inside a sweep file's ``task:`` or ``evaluation:`` section becomes
    that scorer's EngineConfig over its defaults; a wrong key or value fails naming it."""
    from mtp.config import ConfigError
    from mtp.sweep.evaluation import EvalSpec
    from mtp.tasks.speed import SpeedSpec

    task = TaskSpec.parse({"name": "polynomial", "engine": {"device": "cpu", "tree": [2, 1], "compile": True}})
    assert task.engine == EngineConfig(max_batch_size=64, device="cpu", tree=(2, 1), compile=True)
    assert SpeedSpec.parse({"name": "speed", "engine": {"dtype": "fp32"}}).engine.dtype == "fp32"
    evaluation = EvalSpec.parse({"max_new_tokens": 64, "engine": {"max_batch_size": 4}})
    assert evaluation.generation.engine == EngineConfig(max_batch_size=4) and evaluation.generation.max_new_tokens == 64
    with pytest.raises(ConfigError, match="task.engine.compile"):
        TaskSpec.parse({"name": "polynomial", "engine": {"compile": "fast"}})
    with pytest.raises(ConfigError, match="evaluation.engine.batch: unknown key"):
        EvalSpec.parse({"engine": {"batch": 4}})
    with pytest.raises(TaskError, match="max_batch_size"):
        SpeedSpec.parse({"name": "speed", "engine": {"max_batch_size": 4}})


def test_corpus_holds_train_problems_once(tmp_path):
    t = spec("polynomial")
    path = t.write_corpus(tmp_path)
    lines = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(lines) == 300 == len(set(lines))
    assert all(splits.split_of(text) == "train" for text in lines)
    mtime = path.stat().st_mtime_ns
    assert t.write_corpus(tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
    assert spec("polynomial", train_problems=301).corpus_path(tmp_path) != path
    assert spec("polynomial", test_problems=7, progress_problems=3).corpus_path(tmp_path) == path  # same lines


@torch.no_grad()
def test_engine_scoring_matches_plain_greedy_decoding():
    """Batched engine answers equal a token-by-token argmax loop over the model's forward."""
    torch.manual_seed(0)
    model = MTPTransformer(model_preset("debug", n_future=2)).eval()
    tok = ByteTokenizer()
    problems = spec("polynomial").problems("test", 12, "in_domain")
    exact, correct, total = 0, 0, 0
    for p in problems:
        ids = [tok.eos_id, *tok.encode(p.prompt)]
        answer = tok.encode(p.answer)
        for _ in answer:
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        got = ids[-len(answer):]
        exact += got == answer
        correct += sum(a == b for a, b in zip(answer, got))
        total += len(answer)
    result = score(Engine(model, tok, EngineConfig(max_batch_size=5)), problems)
    assert result == {"exact_match": exact / len(problems), "token_accuracy": correct / total}


def test_sweep_task_section_trains_on_the_corpus_written_only_when_prepared(tmp_path, monkeypatch):
    from mtp.sweep.spec import SweepError, parse_spec

    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path))
    sweep = {"task": {"name": "stargraph", "train_problems": 50, "test_problems": 5},
             "space": {"model.n_future": {"grid": [1, 2]}}, "metric": "task/in_domain/exact_match", "mode": "max"}
    spec = parse_spec(sweep)
    corpus = spec.task.corpus_path()
    assert spec.base().data.source == str(corpus) and str(corpus).startswith(str(tmp_path))
    assert not any(tmp_path.iterdir())  # parsing a sweep file writes nothing
    assert list(spec.scorers) == ["task"]
    spec.scorers["task"].prepare()  # what the driver does before the first trial
    assert corpus.is_file()
    with pytest.raises(SweepError, match="not reported by the task.*task/in_domain/token_accuracy"):
        parse_spec({**sweep, "metric": "val/bpb"})
    with pytest.raises(SweepError, match="remove data.source"):
        parse_spec({**sweep, "config": {"data": {"source": "stdlib"}}})
    with pytest.raises(SweepError, match="task.name"):
        parse_spec({**sweep, "task": {"name": "sudoku"}})


def test_task_metric_is_logged_over_training_at_each_intermediate_checkpoint(tmp_path):
    from _jobs import tiny_config
    from mlflow.tracking import MlflowClient
    from mtp.sweep.scorers import ScoreProgress
    from mtp.train import train

    task = TaskSpec.parse({"name": "polynomial", "train_problems": 300, "test_problems": 12, "progress_problems": 5})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("progress")).info.run_id
    cfg = tiny_config(tmp_path, **{"data.source": str(task.write_corpus(tmp_path)), "train.max_steps": 8,
                                   "train.checkpoint_every": 3})
    train(cfg, callbacks=[ScoreProgress(client, run_id, task, final_step=8)])
    history = client.get_metric_history(run_id, "task/in_domain/exact_match")
    assert [m.step for m in history] == [3, 6]  # step 8 is the final, full-set evaluation's
    tokens = client.get_metric_history(run_id, "task/out_of_domain/token_accuracy")
    assert [m.step for m in tokens] == [3, 6] and all(0.0 <= m.value <= 1.0 for m in tokens)
    first = task.eval_sets(limit=5)
    assert {k: [p.text for p in v] for k, v in first.items()} == {
        k: [p.text for p in v[:5]] for k, v in task.eval_sets().items()}  # the same problems each time
    with pytest.raises(TaskError, match="progress_problems"):
        TaskSpec.parse({"name": "polynomial", "progress_problems": -1})


def test_summary_pools_seeds_into_mean_and_std(tmp_path):
    from mtp.sweep.report import write_summary
    from mtp.sweep.summary import TrialRow

    values = {(1, 64): [0.2, 0.4, 0.6], (2, 64): [0.5, 0.5, 0.5], (1, 128): [0.7, 0.9, 0.8]}
    rows = [TrialRow(f"t{n}{d}{s}", "ok", {"model.n_future": n, "model.dim": d, "train.seed": s},
                     {"task/in_domain/exact_match": v})
            for (n, d), vs in values.items() for s, v in enumerate(vs)]
    rows.append(TrialRow("failed", "error", {"model.n_future": 2, "model.dim": 128, "train.seed": 0}, {}))
    paths = write_summary(rows, ["task/in_domain/exact_match"], "model.n_future", "model.dim", tmp_path, "test")
    table = (tmp_path / "task_summary.md").read_text()
    assert "| 64 | 0.400 ± 0.200 (3) | 0.500 ± 0.000 (3) |" in table
    assert "| 128 | 0.800 ± 0.100 (3) | - |" in table
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_speed_task_reports_every_declared_metric(tmp_path):
    from _jobs import tiny_config
    from mtp.tasks.speed import SpeedSpec
    from mtp.train import train

    checkpoint = train(tiny_config(tmp_path, **{"model.n_future": 3, "train.max_steps": 2})).checkpoint
    spec = SpeedSpec.parse({"name": "speed", "prompts": 3, "prompt_tokens": 8, "max_new_tokens": 6, "heldout": 2,
                            "batch_sizes": [1, 2]})
    metrics = spec.evaluate(checkpoint)
    assert sorted(metrics) == sorted(spec.metric_names())
    for key, value in metrics.items():
        assert np.isfinite(value), key
        if key.endswith("tokens_per_forward"):
            assert 1.0 <= value <= 3.0, key  # at most n_future tokens per forward
    with pytest.raises(TaskError, match="batch_sizes"):
        SpeedSpec.parse({"name": "speed", "batch_sizes": [0]})


def test_speed_prompts_and_texts_spread_over_every_held_out_file():
    from mtp.data import pack
    from mtp.tasks.speed import block_texts, held_out_files, spread_blocks

    eos, pad = 257, 258
    docs = [[65 + d] * (40 * (d + 1)) + [eos] for d in range(6)]  # file d: 40(d+1) bytes of one letter, then eos
    val = pack(np.array([t for doc in docs for t in doc]), 17, pad_id=pad)  # blocks of 17: files straddle blocks
    prompts, forced = spread_blocks(val, 3, 5)
    assert not set(prompts) & set(forced) and len(prompts) == 3 and len(forced) == 5
    files = held_out_files(val, eos)
    assert files[0] == 0 and files[-1] == 5  # the first block starts in file 0, the last in file 5
    assert {files[i] for i in prompts + forced} >= {0, 5}  # from the first file to the last, not the first two
    assert all(len(set(text)) == 1 for text in block_texts(val, prompts[:1]))  # one file's letter, no eos
    with pytest.raises(ValueError, match="usable blocks, 60 needed"):
        spread_blocks(val, 20, 40)


def test_every_paper_sweep_file_belongs_to_one_named_experiment():
    from pathlib import Path

    from mtp.experiments.catalog import EXPERIMENTS

    spaces = Path(__file__).resolve().parents[1] / "tune_spaces"
    named = [f for files in EXPERIMENTS.values() for f in files]
    assert sorted(named) == sorted(p.name for p in spaces.glob("paper_*.yaml") if p.name != "paper_grid.yaml")


def test_the_finetuning_file_names_no_model_shape_and_confounds_are_computed(tmp_path):
    """Stage 2 takes each pretrained checkpoint's shape (n' changes only the heads), so a finetuning
    file that sets one is refused naming it; the confound column states every cost ratio off by > 1%."""
    import yaml

    from mtp.config import build_config
    from mtp.experiments.finetune import Costs, read_finetune_file
    from mtp.sweep import SweepError

    sweep = {"task": {"name": "polynomial", "train_problems": 50, "test_problems": 5},
             "space": {"model.n_future": {"grid": [1, 4]}}, "metric": "task/in_domain/exact_match", "mode": "max",
             "config": {"train": {"seq_len": 64, "max_steps": 10}}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert read_finetune_file(path)["name"] == "ft"
    path.write_text(yaml.safe_dump({**sweep, "config": {"model": {"dim": 48, "n_layers": 6}}}))
    with pytest.raises(SweepError, match="model.dim, model.n_layers come.* from each pretrained checkpoint"):
        read_finetune_file(path)

    def cfg(n: int, steps: int, layers: int = 6):
        return build_config(None, {"model.dim": 48, "model.n_layers": layers, "model.n_future": n,
                                   "model.param_matched": True, "train.seq_len": 64, "train.max_steps": steps})

    n1, n4 = Costs.of(cfg(1, 100), cfg(1, 50)), Costs.of(cfg(4, 100), cfg(1, 50, layers=3))
    assert n1.pretraining_parameters == n4.pretraining_parameters  # param-matched
    text = n4.against(n1)
    assert text.startswith("pretraining flops x1.") and "finetuned parameters x0." in text
    assert "pretraining parameters" not in text
    assert n1.against(n1) == "none (parameters and FLOPs of both stages within 1%)"
