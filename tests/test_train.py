"""The training loop in a plain process: it learns, checkpoints, and resumes exactly."""

import math
import re

import pytest
import torch

from _jobs import losses, tiny_config
from mtp.checkpoint import load_model, load_train_state
from mtp.config import ConfigError
from mtp.train import TrainingError, lr_factor, train


def test_training_logs_and_writes_a_loadable_checkpoint(tmp_path):
    """What a run leaves behind; its numerics are pinned by test_loss_trace.py."""
    cfg = tiny_config(tmp_path, **{"train.max_steps": 6, "train.eval_every": 6, "train.log_every": 3,
                                   "train.checkpoint_every": 6})
    result = train(cfg)
    last = result.history[-1]
    assert [h["step"] for h in result.history] == [3, 6]
    for key in ("train/loss_head_0", "train/loss_head_1", "val/loss_head_1", "val/bpb", "perf/tokens_per_s",
                "perf/peak_memory_bytes", "train/lr", "train/grad_norm"):
        assert math.isfinite(last[key]), key
    assert result.checkpoint == tmp_path / "runs" / "tiny" / "checkpoints" / "step_000006"
    model, _, config = load_model(result.checkpoint)
    assert config["model"]["n_future"] == 2 and model.cfg.n_future == 2
    state = load_train_state(result.checkpoint)
    assert state["step"] == 6 and state["data_position"]["offset"] > 0
    again = train(cfg)  # the same run, already complete: nothing to train, the same final checkpoint
    assert again.step == 6 and again.history == [] and again.checkpoint == result.checkpoint


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    full = train(tiny_config(tmp_path, **{"train.max_steps": 8}))
    midway = tmp_path / "runs" / "tiny" / "checkpoints" / "step_000004"
    resumed = train(tiny_config(tmp_path, **{"train.max_steps": 8, "tracking.run_name": "resumed"}), resume_from=midway)
    expected, got = losses(full.history, 4), losses(resumed.history)
    assert list(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    a, _, _ = load_model(full.checkpoint)
    b, _, _ = load_model(resumed.checkpoint)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("schedule", ["naive", "batched"])
def test_every_schedule_trains_like_sequential(tmp_path, schedule):
    """The users' loop on each schedule follows the sequential schedule's losses. (Compiled,
    ``batched`` also passes this, in ~60 s of CPU time: too slow for the suite.)"""
    seq = train(tiny_config(tmp_path, **{"train.max_steps": 3, "tracking.run_name": "seq"}))
    other = train(tiny_config(tmp_path, **{"train.max_steps": 3, "train.schedule": schedule,
                                           "tracking.run_name": schedule}))
    for step, value in losses(seq.history).items():
        assert losses(other.history)[step] == pytest.approx(value, rel=1e-4)


def test_divergence_stops_at_the_next_check_and_keeps_only_finite_checkpoints(tmp_path):
    """A non-finite gradient norm is noted without waiting for the device, and acted on at the
    next log or checkpoint step (here every 2 steps), before a checkpoint could save it."""
    cfg = tiny_config(tmp_path, **{"train.lr": 1e4, "train.grad_clip": 0.0, "train.warmup_steps": 20,
                                   "train.max_steps": 40, "train.log_every": 4, "train.checkpoint_every": 2})
    with pytest.raises(TrainingError, match=r"between steps (\d+) and (\d+) was not finite: training diverged") as caught:
        train(cfg)
    first, last = map(int, re.search(r"between steps (\d+) and (\d+)", str(caught.value)).groups())
    assert last % 2 == 0 and first == last - 1 and last < 40
    saved = sorted((tmp_path / "runs" / "tiny" / "checkpoints").iterdir())
    assert saved and saved[-1].name == f"step_{last - 2:06d}" and str(saved[-1]) in str(caught.value)
    for checkpoint in saved:
        model, _, _ = load_model(checkpoint)
        assert all(torch.isfinite(p).all() for p in model.parameters()), checkpoint


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="train.schedule"):
        tiny_config(tmp_path, **{"train.schedule": "fast"})
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(tiny_config(tmp_path, **{"model.vocab_size": 100}))


def test_lr_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    tc = tiny_config(tmp_path, **{"train.max_steps": 100, "train.warmup_steps": 10, "train.min_lr_ratio": 0.1}).train
    factors = [lr_factor(s, tc) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.1)
