"""Does the trusted oracle give honest code plain Python's verdict? Measured on HumanEval.

Programs: each problem's canonical solution, and variants of it that wrap the entry point
and change what it returns in one systematic way each (``VARIANTS``: numpy scalars,
subclasses of plain types, namedtuples and dict subclasses, iterators, return-type
changes, exact Fraction/Decimal, off-by-one, arguments changed in place). Each program is
scored by the trusted oracle (``score_samples``, the path ``jobs/evaluate.py`` takes) and
by plain Python: prompt + completion + test + ``check(entry_point)`` in a fresh
``python -I`` subprocess, passed when it exits 0. A disagreement where only the oracle
passes would be a forged pass.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mtp.evaluation.benchmarks import Benchmark, Problem
from mtp.evaluation.sandbox_pool import ProgramScorer, RunnerConfig
from mtp.evaluation.scoring import score_samples
from mtp.sandbox import Limits

# Generous: a parity run compares verdicts, and the plain subprocesses share the cores with it.
LIMITS = Limits(timeout_s=10.0, memory_mb=1024, output_bytes=4096)
PLAIN_TIMEOUT_S = 30.0

# Each variant is the body of ``_mtp_change(value, args)``: what the wrapped entry point returns
# instead of ``value`` (``args``: the call's arguments, after the call). ``_mtp_deep(value, leaf)``
# applies ``leaf`` to every non-container inside ``value``, keeping the containers' types.
VARIANTS = {
    "canonical": None,
    "numpy_scalars": """
    import numpy
    def leaf(v):
        if type(v) is bool: return numpy.bool_(v)
        if type(v) is int and -2**63 <= v < 2**63: return numpy.int64(v)
        if type(v) is float: return numpy.float64(v)
        if type(v) is str: return numpy.str_(v)
        return v
    return _mtp_deep(value, leaf)""",
    "subclasses": """
    class I(int): pass
    class F(float): pass
    class S(str): pass
    class L(list): pass
    def leaf(v):
        return {int: I, float: F, str: S}.get(type(v), lambda x: x)(v)
    value = _mtp_deep(value, leaf)
    return L(value) if type(value) is list else value""",
    "namedtuple_dict_subclasses": """
    import collections
    if type(value) is tuple:
        return collections.namedtuple("Answer", [f"f{i}" for i in range(len(value))])(*value)
    if type(value) is dict:
        return collections.OrderedDict(value) if len(value) % 2 else collections.defaultdict(list, value)
    if type(value) is list and all(type(v) is str for v in value):
        return list(collections.Counter(value).elements())
    return value""",
    "iterators": """
    if type(value) is list: return iter(value)
    if type(value) is tuple: return (v for v in value)
    if type(value) is str: return map(str, value)
    return value""",
    "type_changes": """
    if type(value) is list: return tuple(value)
    if type(value) is tuple: return list(value)
    if type(value) is bool: return int(value)
    if type(value) is int: return float(value)
    if type(value) is float and value.is_integer(): return int(value)
    return value""",
    "exact_numbers": """
    import decimal, fractions
    def leaf(v):
        if type(v) is int: return fractions.Fraction(v)
        if type(v) is float and v == v and abs(v) != float("inf"): return decimal.Decimal(v)
        return v
    return _mtp_deep(value, leaf)""",
    "off_by_one": """
    if type(value) is bool: return not value
    if type(value) in (int, float): return value + 1
    if type(value) is str: return value[:-1] if value else "x"
    if type(value) is list: return value[:-1] if value else [0]
    if type(value) is tuple: return value[:-1] if value else (0,)
    return value""",
    "arguments_changed": """
    for arg in args:
        if type(arg) is list: arg.reverse()
        elif type(arg) is dict: arg.clear()
    return value""",
}

_WRAPPER = '''

def _mtp_deep(value, leaf):
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_mtp_deep(v, leaf) for v in value)
    if type(value) is dict:
        return {{_mtp_deep(k, leaf): _mtp_deep(v, leaf) for k, v in value.items()}}
    return leaf(value)


def _mtp_change(value, args):{body}


def _mtp_wrap(function):
    def wrapped(*args, **kwargs):
        return _mtp_change(function(*args, **kwargs), args)
    return wrapped


{entry} = _mtp_wrap({entry})
'''


def variant(problem: Problem, kind: str) -> str:
    """The completion of ``kind``: the canonical solution, its entry point wrapped unless ``kind`` is canonical."""
    body = VARIANTS[kind]
    completion = problem.canonical_solution or ""
    return completion if body is None else completion + _WRAPPER.format(body=body, entry=problem.candidate_names[0])


def plain_python(problem: Problem, completion: str) -> bool:
    """Plain Python's verdict: the whole program in a fresh interpreter, passed when it exits 0."""
    try:
        done = subprocess.run([sys.executable, "-I", "-c", problem.program(completion)], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=PLAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@dataclass
class ParityReport:
    programs: int
    by_variant: dict[str, dict[str, int]]  # variant -> {programs, plain_passed, oracle_passed, disagreements, forged}
    disagreements: list[dict] = field(default_factory=list)  # task_id, variant, plain, oracle, oracle's detail

    @property
    def forged(self) -> int:
        return sum(1 for d in self.disagreements if d["oracle"] and not d["plain"])


def compare(benchmark: Benchmark, runner: RunnerConfig | ProgramScorer, variants: list[str] | None = None,
            plain_workers: int = 2) -> ParityReport:
    """Score every (HumanEval-shaped problem, variant) both ways."""
    kinds = variants or list(VARIANTS)
    jobs = [(p, kind, variant(p, kind)) for p in benchmark.problems for kind in kinds]
    with ThreadPoolExecutor(plain_workers) as pool:
        plain = list(pool.map(lambda job: plain_python(job[0], job[2]), jobs))
    result = score_samples(benchmark, [(p.task_id, c) for p, _, c in jobs], ks=[1], limits=LIMITS, runner=runner,
                           progress=False, oracle="trusted")
    counts: dict[str, Counter] = {kind: Counter() for kind in kinds}
    report = ParityReport(len(jobs), {})
    for (problem, kind, _), plain_passed, sample in zip(jobs, plain, result.samples):
        row = counts[kind]
        row.update(programs=1, plain_passed=plain_passed, oracle_passed=sample.passed,
                   disagreements=plain_passed != sample.passed, forged=sample.passed and not plain_passed)
        if plain_passed != sample.passed:
            report.disagreements.append({"task_id": problem.task_id, "variant": kind, "plain": plain_passed,
                                         "oracle": sample.passed, "detail": sample.detail[:300]})
    report.by_variant = {kind: {key: row[key] for key in ("programs", "plain_passed", "oracle_passed",
                                                             "disagreements", "forged")} for kind, row in counts.items()}
    return report
