"""The comparison machinery: verdicts from the numbers, floors on known toy test sets, arms' FLOPs."""

from __future__ import annotations

import numpy as np
import pytest

from mtp.compare.floors import induction_floors, polynomial_floors, stargraph_floors, strongest
from mtp.compare.stats import bootstrap_difference, verdict
from mtp.tasks.problem import Problem

# ----------------------------------------------------------------------- verdicts


def _seeds(mean: float, spread: float, n: int = 5, seed: int = 0) -> list[float]:
    return list(mean + spread * np.random.default_rng(seed).standard_normal(n))


def test_known_effect_is_better_and_reversed_is_worse():
    base, arm = _seeds(0.50, 0.02), _seeds(0.60, 0.02, seed=1)
    v = verdict(arm, base, floor=0.30, margin=0.05)
    assert v.word == "better" and v.interval.low > 0 and "excludes 0" in v.text()
    assert verdict(base, arm, floor=0.30, margin=0.05).word == "worse"
    # lower is better for a loss: the same numbers are "worse"
    assert verdict(arm, base, floor=None, margin=0.0, mode="min").word == "worse"


def test_no_effect_is_no_difference_with_a_detectable_size():
    base, arm = _seeds(0.50, 0.05), _seeds(0.50, 0.05, seed=1)
    v = verdict(arm, base, floor=0.30, margin=0.05)
    assert v.word == "no difference detected"
    assert v.interval.low < 0 < v.interval.high
    detectable = float(v.reason.split()[-1])
    assert 0.03 < detectable < 0.2  # 2.8 standard errors of a difference of two 5-seed means with std 0.05


def test_baseline_under_its_floor_is_inconclusive_whatever_the_arm():
    base, arm = _seeds(0.33, 0.01), _seeds(0.60, 0.01, seed=1)
    v = verdict(arm, base, floor=0.347, margin=0.02)
    assert v.word == "inconclusive" and "floor 0.347" in v.reason
    assert v.interval.low > 0  # the interval is still shown: it excludes 0, but the baseline learned nothing
    # just above the floor but not by the margin fixed beforehand: still inconclusive
    assert verdict(arm, _seeds(0.36, 0.01), floor=0.347, margin=0.05).word == "inconclusive"
    one = verdict(arm, [0.5], floor=0.3, margin=0.0)
    assert one.word == "inconclusive" and one.interval is None  # one seed: no interval


def test_bootstrap_is_seeded_and_brackets_the_difference():
    a, b = _seeds(0.6, 0.05), _seeds(0.5, 0.05, seed=1)
    first, again = bootstrap_difference(a, b, seed=3), bootstrap_difference(a, b, seed=3)
    assert first == again
    assert first.low < first.diff < first.high
    assert bootstrap_difference(a, b, seed=4) != first


def test_verdict_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        verdict([1, 2], [1, 2], floor=None, margin=0, mode="best")
    with pytest.raises(ValueError, match="margin"):
        verdict([1, 2], [1, 2], floor=None, margin=-1)


# ------------------------------------------------------------------------- floors


def test_induction_floors_on_a_toy_test_set():
    problems = [
        # names seen Ab, Cd, Ef; second bytes {b, d, f}; query "A" in a sentence that already holds Cd
        Problem("Ab met Cd. Ef saw Ab. Cd paid A", "b"),
        # only Ab and Cd seen, the query's sentence holds Cd: guess_seen_other has one candidate, b
        Problem("Ab met Cd. Cd hit A", "b"),
    ]
    floors = induction_floors(problems)
    assert floors["guess_seen"]["exact_match"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert floors["guess_seen_other"]["exact_match"] == pytest.approx((1 / 2 + 1) / 2)


def test_polynomial_floors_fit_on_training_problems_only():
    fit = [Problem("o3x=", "30000"), Problem("+xx=", "02000"), Problem("*x2=", "02000"), Problem("~1=", "60000")]
    test = [Problem("o5+x1=", "50000"), Problem("+x~x=", "00000"), Problem("+1x=", "11000"), Problem("*xx=", "00100")]
    floors = polynomial_floors(test, fit)
    assert floors["constant"]["exact_match"] == 0.0  # "02000" is right on none of them
    assert floors["two_rule_lookup"]["exact_match"] == 0.25  # the o-constant rule gets the first
    # token accuracy: per answer byte, as the models are scored
    assert floors["constant"]["token_accuracy"] == pytest.approx((3 + 4 + 3 + 3) / 20)
    assert strongest(floors, "exact_match") == ("two_rule_lookup", 0.25)


def test_floor_names_are_the_floors_computed():
    from mtp.compare.floors import NAMES, task_floors

    toy = {"induction": [Problem("Ab met Cd. Cd hit A", "b")], "polynomial": [Problem("o3x=", "30000")],
           "stargraph": [Problem("kq,zc,qa,kz|kc=", "kzc")]}
    for task, names in NAMES.items():
        assert tuple(task_floors(task, toy[task], toy["polynomial"])) == names


def test_stargraph_floors_on_a_toy_graph():
    # start k, arms k-q-a and k-z-c, goal c: path kzc
    test = [Problem("kq,zc,qa,kz|kc=", "kzc")]
    floors = stargraph_floors(test)
    assert floors["copy_start_goal"] == {"exact_match": 0.0, "token_accuracy": pytest.approx(2 / 3)}
    assert floors["shortcut"]["exact_match"] == 0.5
    assert floors["shortcut"]["token_accuracy"] == pytest.approx((1 + 2 * 0.5) / 3)
    # copy k and c, guess the one node in between among q, z, a
    assert floors["copy_and_guess"] == {"exact_match": pytest.approx(1 / 3), "token_accuracy": pytest.approx((2 + 1 / 3) / 3)}


# --------------------------------------------------------------------------- arms


def _cfg(n_future: int, steps: int = 100, batch: int = 8, param_matched: bool = False):
    from mtp.config import build_config

    return build_config(None, {**_base_fields(), "model.param_matched": param_matched, "model.n_future": n_future,
                               "train.max_steps": steps, "train.batch_size": batch})


def test_compute_matched_steps_by_hand():
    from mtp.compare.arms import compute_matched_steps

    # dim 64, 4 heads of 16, SwiGLU width 192: a block has 64*16*16 + 3*64*192 + 2*64 = 53376 parameters;
    # the unembedding 260*64 = 16640 per head (6 FLOPs per parameter, forward + backward); causal attention,
    # QK^T and AV over 32 keys on average: 2 * 2 * 4 heads * 16 dims * 32 = 8192 FLOPs per layer forward, 3x in all
    n1 = 6 * (3 * 53376 + 16640) + 3 * 3 * 8192  # trunk 2 + head 1
    n2 = 6 * (4 * 53376 + 2 * 16640) + 3 * 4 * 8192  # trunk 2 + heads 2 (not param-matched)
    assert compute_matched_steps(_cfg(1), _cfg(2)) == -(-100 * n2 // n1) == 140
    # more tokens per step on the baseline: fewer steps for the same FLOPs
    assert compute_matched_steps(_cfg(1, batch=16), _cfg(2)) == 70
    # param-matched n=2 costs only its second unembedding: a few steps more
    assert 100 < compute_matched_steps(_cfg(1, param_matched=True), _cfg(2, param_matched=True)) < 110


def test_arms_expand_to_labelled_configs():
    from mtp.compare.arms import ArmsSpec, overrides
    from mtp.config import build_config

    arms = ArmsSpec(compute_matched=True, next_token_heads=True).arms([1, 2])
    assert [a.label for a in arms] == ["n=1", "n=2", "n=1 compute-matched to n=2", "n=2 all heads t+1"]
    build = lambda fields: build_config(None, {**_base_fields(), **fields})
    assert overrides(arms[2], build) == {"model.n_future": 1, "train.max_steps": 140}
    assert overrides(arms[3], build) == {"model.n_future": 2, "train.head_targets": "next"}
    with pytest.raises(ValueError, match="n=1 baseline"):
        ArmsSpec(compute_matched=True).arms([2, 4])
    with pytest.raises(ValueError, match="arms.compute_match: unknown key"):
        ArmsSpec.parse({"compute_match": True})


def _base_fields():
    return {"model.dim": 64, "model.n_layers": 3, "model.n_heads": 4, "model.multiple_of": 32, "model.max_seq_len": 64,
            "model.param_matched": False, "train.seq_len": 64, "train.max_steps": 100, "train.batch_size": 8}


# ------------------------------------------------------------------- sweep tables


def _fake_sweep(effect: float, baseline: float, seeds: int = 5):
    """Trials of a sweep: two widths, arms n=1 and n=2, ``effect`` added to n=2 at width 64 only."""
    from mtp.sweep.summary import TrialRow

    rng = np.random.default_rng(0)
    rows = []
    for dim in (32, 64):
        for n in (1, 2):
            for seed in range(seeds):
                value = baseline + (effect if (n == 2 and dim == 64) else 0.0) + 0.01 * rng.standard_normal()
                rows.append(TrialRow(f"t{dim}{n}{seed}", "ok", {"model.dim": dim, "model.n_future": n, "train.seed": seed},
                                     {"task/in_domain/exact_match": value}))
    rows.append(TrialRow("broken", "error", {"model.dim": 32, "model.n_future": 2, "train.seed": 9}, {}, error="boom"))
    return rows


def test_a_fake_sweep_gets_its_verdicts_from_the_numbers(tmp_path):
    from mtp.compare.table import VerdictSpec, comparisons, write_comparison

    metric = "task/in_domain/exact_match"
    floors = {"guess_seen": 0.347, "guess_seen_other": 0.512}
    spec = VerdictSpec(margin=0.05)
    records = comparisons(_fake_sweep(effect=0.1, baseline=0.7), metric, floors, spec)
    by = {(r["model.dim"], r["arm"]): r for r in records}
    assert by[(64, "n=2")]["verdict"].startswith("better") and by[(64, "n=2")]["low"] > 0
    assert by[(32, "n=2")]["verdict"].startswith("no difference detected (smallest detectable effect")
    assert by[(32, "n=2")]["n"] == 5  # the errored trial is left out
    assert by[(32, "n=1")]["verdict"] == "baseline"
    under = comparisons(_fake_sweep(effect=0.1, baseline=0.53), metric, floors, spec)
    assert all(r["verdict"].startswith("inconclusive") for r in under if r["arm"] == "n=2")
    # the floor the sweep file names, not the strongest one, when it names one
    named = comparisons(_fake_sweep(effect=0.1, baseline=0.53), metric, floors, VerdictSpec(0.05, "guess_seen"))
    assert [r["verdict"].split()[0] for r in named if r["arm"] == "n=2"] == ["no", "better"]
    paths = write_comparison(_fake_sweep(0.1, 0.7), [metric], {metric: floors}, spec, "max", tmp_path)
    text = paths[1].read_text()
    assert "guess_seen_other 0.512" in text and "clear guess_seen_other (0.512) by 0.05" in text
    assert "| 64 | n=2 |" in text


def test_a_sweep_file_with_arms_searches_arm_labels_and_builds_their_configs():
    from mtp.sweep.spec import SweepError, parse_spec

    raw = {"name": "arms", "metric": "val/bpb",
           "config": {"model": {"dim": 64, "n_layers": 3, "n_heads": 4, "multiple_of": 32, "max_seq_len": 64},
                      "train": {"seq_len": 64, "max_steps": 100, "batch_size": 8}},
           "space": {"model.n_future": {"grid": [1, 2]}, "train.seed": {"grid": [0, 1]}},
           "arms": {"compute_matched": True, "next_token_heads": True}, "verdict": {"margin": 0.05},
           "plot": {"x": "arm", "lines": "model.dim"}}
    spec = parse_spec(raw)
    assert list(spec.searched) == ["arm", "train.seed"] and spec.grid_size() == 8
    assert spec.verdict.margin == 0.05
    compute = spec.base({"arm": "n=1 compute-matched to n=2", "train.seed": 1})
    assert (compute.model.n_future, compute.train.max_steps, compute.train.seed) == (1, 140, 1)
    heads = spec.base({"arm": "n=2 all heads t+1"})
    assert (heads.model.n_future, heads.train.head_targets, heads.train.max_steps) == (2, "next", 100)
    assert len(spec.probe_configs()) == 8
    with pytest.raises(SweepError, match="n=1 baseline"):
        parse_spec({**raw, "space": {"model.n_future": {"grid": [2, 4]}}})
    with pytest.raises(SweepError, match="verdict"):
        parse_spec({**raw, "verdict": {"margin": -1}})
    with pytest.raises(SweepError, match="not a floor of this sweep's task"):
        parse_spec({**raw, "verdict": {"floor": "guess_seen"}})  # no task: no floors


def test_formation_reports_best_beside_final_and_the_step_each_seed_formed():
    from mtp.compare.table import formation

    rows = [r for r in _fake_sweep(effect=0.0, baseline=0.5, seeds=2) if r.status == "ok" and r.params["model.dim"] == 64]
    histories = {r.trial_id: [(500, 0.2), (1000, 0.95 if r.params["model.n_future"] == 2 else 0.6), (1500, 0.5)]
                 for r in rows}
    histories[rows[-1].trial_id] = [(500, 0.1), (1000, 0.3), (1500, 0.92)]  # the last n=2 seed forms late
    text = formation(rows, histories, "task/counterfactual/exact_match", 0.9)
    assert "| dim=64 | n=1 | 0.500 ± 0.000 (2) | 0.600 ± 0.000 (2) | 0/2 | - |" in text
    assert "| dim=64 | n=2 | 0.710 ± 0.297 (2) | 0.935 ± 0.021 (2) | 2/2 | 1000, 1500 |" in text
