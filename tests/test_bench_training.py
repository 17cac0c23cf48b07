"""The training benches' measurement code (``mtp.bench``) end to end on tiny models.

Behaviour only (what each schedule keeps alive, which rows the loop table has, that the
bare loop does the same training), no timing claims: memory counts are deterministic,
step times are not.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch

from _jobs import tiny_config
from mtp.bench.loop import BARE, TRAIN, StepClock, bare_loop, format_loop_table, measure_loops, timed_config
from mtp.bench.schedules import MEMORY_TARGET, BenchSpec, compare, format_table
from mtp.checkpoint import load_model
from mtp.config import ConfigError
from mtp.data import prepare_data
from mtp.model import count_parameters
from mtp.train import train

TINY = BenchSpec(device="cpu", preset="tiny", batch_size=2, seq_len=64, chunk_size=16, rounds=1, steps_per_round=1)


def test_schedules_report_every_variant_and_sequential_saves_memory():
    rows = compare(TINY, vocab_size=512, log=lambda _: None)
    by_name = {r.variant: r for r in rows}
    assert list(by_name) == ["n1", "naive", "sequential", "sequential-chunked", "batched"]
    assert all(r.tokens_per_s > 0 and r.peak_memory_bytes > 0 for r in rows)
    n1 = by_name["n1"]
    assert (n1.n_future, n1.time_ratio, n1.memory_ratio, n1.flop_ratio) == (1, 1.0, 1.0, 1.0)
    assert len({r.params for r in rows}) == 1, "n=4 variants must be parameter-matched to n=1"
    assert all(r.flop_ratio > 1 for r in rows[1:]) and len({r.flop_ratio for r in rows[1:]}) == 1

    # What the schedules are for: never more than one head's logits, and then not even one.
    naive, seq, chunked = by_name["naive"], by_name["sequential"], by_name["sequential-chunked"]
    assert chunked.peak_memory_bytes < seq.peak_memory_bytes < naive.peak_memory_bytes
    assert seq.memory_ratio <= MEMORY_TARGET
    assert naive.memory_ratio > 1
    # Batched: as many block activations as n=1 (param-matched) and no logits; what it adds is
    # the heads' stacked weights (saved for the backward) and their gradient, fixed costs that
    # dominate only at toy sizes like this one.
    heads_bytes = count_parameters(TINY.model_config(512, 4))["heads"] * 4
    assert by_name["batched"].peak_memory_bytes - n1.peak_memory_bytes < 2 * heads_bytes
    table = format_table(TINY, rows)
    assert "sequential-chunked" in table and "target sequential:" in table and "target batched:" in table


def test_schedules_reject_a_preset_too_shallow_to_param_match():
    with pytest.raises(ConfigError, match="model.param_matched"):
        replace(TINY, preset="debug").model_config(512, 4)


def test_bare_loop_does_the_same_training_as_mtp_train(tmp_path):
    """Same model, batches, schedule and update: the weights after 6 steps agree (the gradient
    norms are summed in another order, so to float rounding, not bit for bit)."""
    cfg = tiny_config(tmp_path, **{"train.max_steps": 6, "train.log_every": 3, "train.checkpoint_every": 6})
    data = prepare_data(cfg.data, cfg.train.seq_len)
    bare = bare_loop(cfg, data, StepClock())
    model, _, _ = load_model(train(cfg, data=data).checkpoint)
    for (name, a), b in zip(model.state_dict().items(), bare.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_loop_table_times_both_loops_over_the_same_window(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.log_every": 2})
    data = prepare_data(cfg.data, cfg.train.seq_len)
    assert timed_config(cfg, 4).train.max_steps == 8  # a warm-up interval, the window, a closing interval
    results = measure_loops(cfg, data, steps=4, repeats=2, via_ray=False, log=lambda _: None)
    assert [r.loop for r in results] == [BARE, TRAIN]
    bare, loop = results
    assert len(bare.tokens_per_s) == len(loop.over_bare) == 2 and all(t > 0 for t in bare.tokens_per_s)
    assert bare.over_bare == [0.0, 0.0] and loop.over_train == []
    assert statistics.median(loop.over_bare) > -0.9  # same work: not ten times faster than bare
    table = format_loop_table(timed_config(cfg, 4), 4, results)
    assert "mtp.train" in table and "vs bare" in table
    with pytest.raises(ValueError, match="multiple of train.log_every"):
        timed_config(cfg, 3)
