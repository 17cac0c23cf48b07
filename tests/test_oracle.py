"""The trusted oracle: forged passes that work in-process fail by construction; HumanEval and MBPP still score right.

Every attack runs on one long-lived sandbox (one warm zygote), then a correct sample
must still pass on it. Each forging completion is also run in-process, where it must
*pass*: that shows the attack is real (and is what the README says that mode cannot stop).
"""

from __future__ import annotations

import math
import secrets
import subprocess
import sys
import textwrap
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from mtp.bench import oracle_parity
from mtp.evaluation import RunnerConfig, load_benchmark, score_samples
from mtp.evaluation.benchmarks import Benchmark, humaneval, humaneval_problem, mbpp_problem
from mtp.sandbox import Limits, OracleProgram, Sandbox, codec, isolation_problem

DATA = Path(__file__).parent / "data"
needs_isolation = pytest.mark.skipif(isolation_problem() is not None, reason=str(isolation_problem()))
LIMITS = Limits(timeout_s=3)
ADD_ROW = {
    "task_id": "T/add", "prompt": 'def add(a, b):\n    """a + b"""\n', "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}
ADD = humaneval_problem(ADD_ROW)
CORRECT = "    return a + b\n"

# Each returns a wrong answer and forges the pass some other way.
FORGERIES = {k: textwrap.dedent(v.lstrip("\n")) for k, v in {
    "nonce_from_inherited_fd": """
        return 0
    import os
    os.write(3, b"P" + os.read(4, 64))
    os._exit(0)
    """,
    "nonce_from_harness_frame": """
        return 0
    import sys
    frame = sys._getframe()
    while frame is not None and "_report" not in frame.f_globals:
        frame = frame.f_back
    frame.f_globals["_report"](frame.f_globals["PASS"])
    """,
    "patched_harness_exit_path": """
        return 0
    import sys
    harness = sys._getframe().f_back.f_globals
    real_report = harness["_report"]
    harness["_report"] = lambda kind, detail="": real_report(harness["PASS"])  # failure path -> pass write
    """,
    "check_replaced_by_trace_hook": """
        return 0
    import sys
    def tracer(frame, event, arg):
        if getattr(frame.f_globals.get("check"), "__name__", "") == "check":
            frame.f_globals["check"] = lambda candidate: None
        return tracer
    sys.settrace(tracer)
    sys._getframe().f_trace = tracer
    """,
}.items()}
FORGERIES["always_equal_object"] = (
    "    class AlwaysEqual:\n        def __eq__(self, other):\n            return True\n    return AlwaysEqual()\n"
)


@pytest.fixture(scope="module")
def box():
    if isolation_problem() is not None:
        pytest.skip(isolation_problem())
    with Sandbox() as sandbox:
        yield sandbox


@needs_isolation
@pytest.mark.parametrize("name", FORGERIES)
def test_forgeries_pass_in_process_and_fail_under_the_trusted_oracle(box, name):
    completion = FORGERIES[name]
    in_process = box.run(ADD.program(completion), LIMITS)
    trusted = box.run(ADD.program(completion), LIMITS, ADD.oracle_program(completion))
    assert in_process.passed and in_process.oracle == "inprocess", in_process
    assert trusted.status == "failed" and trusted.oracle == "trusted", trusted
    assert box.run("", LIMITS, ADD.oracle_program(CORRECT)).passed, "the long-lived worker was poisoned"


# A completion that looks for MTPMARK<24 hex>KRAMPTM in all the memory it can read (every readable
# mapping through /proc/self/mem, as UTF-8/latin-1, UCS-2 and UCS-4 text) and in every object it
# can reach (frames, their code's constants, the garbage collector's objects); written so that no
# marker appears in its own text. It prints how many bytes it read and what it found.
SCANNER = "    return _probe(x)\n" + """
SCANNER_CODE
def _probe(x):
    mem_found, scanned = scan_memory()
    print("SCAN", scanned, sorted(mem_found | scan_objects()))
    return x + 1
""".replace("SCANNER_CODE", 'import ctypes, re, sys, gc\ndef _patterns():\n    out = []\n    for width in (1, 2, 4):\n        z = b"\\x00" * (width - 1)\n        lit = lambda s: re.escape(b"".join(bytes([c]) + z for c in s))\n        out.append((width, re.compile(lit(b"MTP" + b"MARK") + b"(?:[0-9a-f]" + re.escape(z) + b"){24}" + lit(b"KRAM" + b"PTM"))))\n    return out\ndef scan_memory():\n    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: /proc/self/mem becomes ours to open\n    found, scanned = set(), 0\n    with open("/proc/self/maps") as maps:\n        regions = [line.split() for line in maps]\n    with open("/proc/self/mem", "rb", buffering=0) as mem:\n        for fields in regions:\n            if fields[1][0] != "r" or fields[-1] in ("[vvar]", "[vsyscall]"):\n                continue\n            start, end = (int(x, 16) for x in fields[0].split("-"))\n            pos = start\n            while pos < end:\n                size = min(end - pos, 1 << 22)\n                try:\n                    mem.seek(pos)\n                    chunk = mem.read(size)\n                except OSError:\n                    break\n                scanned += len(chunk)\n                for width, pattern in _patterns():\n                    found.update(m.replace(b"\\x00", b"").decode() for m in pattern.findall(chunk))\n                pos += size if pos + size >= end else size - 256\n    return found, scanned\ndef scan_objects():\n    found = set()\n    pattern = re.compile("MTP" "MARK[0-9a-f]{24}KRAM" "PTM")\n    def look(value):\n        if isinstance(value, (str, bytes)):\n            text = value if isinstance(value, str) else value.decode("latin-1")\n            found.update(pattern.findall(text))\n    frame = sys._getframe()\n    while frame is not None:\n        for space in (frame.f_locals, frame.f_globals):\n            for v in list(space.values()):\n                look(v)\n        for c in frame.f_code.co_consts:\n            look(c)\n        frame = frame.f_back\n    for obj in gc.get_objects():\n        if isinstance(obj, dict):\n            items = list(obj.values()) + list(obj.keys())\n        elif isinstance(obj, (list, tuple, set, frozenset)):\n            items = list(obj)\n        elif hasattr(obj, "co_consts"):\n            items = list(obj.co_consts)\n        else:\n            continue\n        for v in items:\n            look(v)\n    return found\n')


def _marker() -> str:
    return "MTP" "MARK" + secrets.token_hex(12) + "KRAM" "PTM"


@needs_isolation
def test_no_test_text_completion_or_output_reaches_a_candidates_memory(box):
    """The address-space rule, on a long-lived worker: after earlier problems (markers in their tests),
    an earlier sample's completion (a marker in its text) and printed output (another), a candidate
    that reads all its memory finds none of them, nor the marker in its own problem's tests; run
    in-process, the same completion finds its own tests' marker (the scan works)."""
    own, earlier_test, earlier_completion, earlier_output, earlier_inprocess = (_marker() for _ in range(5))
    for marker in (earlier_test, earlier_inprocess):
        problem = humaneval_problem({**ADD_ROW, "test": ADD_ROW["test"] + f"    assert {marker!r}\n"})
        assert box.run("", LIMITS, problem.oracle_program(CORRECT)).passed
        assert box.run(problem.program(CORRECT), LIMITS).passed
    chatty = f"    print({earlier_output!r})\n    return a + b if {earlier_completion!r} else 0\n"
    assert box.run("", LIMITS, ADD.oracle_program(chatty)).stdout == f"{earlier_output}\n" * 2
    problem = humaneval_problem({
        "task_id": "T/scan", "prompt": "def scan(x):\n", "entry_point": "scan",
        "test": f"def check(candidate):\n    # {own}\n    assert candidate(1) == 2, {own!r}\n",
    })
    limits = Limits(timeout_s=30)
    trusted = box.run("", limits, problem.oracle_program(SCANNER))
    assert trusted.passed and trusted.oracle == "trusted", trusted
    _, scanned, found = trusted.stdout.split(" ", 2)
    assert int(scanned) > 10 << 20 and found.strip() == "[]", trusted.stdout  # it read its memory and found nothing
    in_process = box.run(problem.program(SCANNER), limits)
    assert in_process.passed and in_process.oracle == "inprocess", in_process
    assert in_process.stdout.split(" ", 2)[2].strip() == repr([own]), in_process.stdout


@needs_isolation
def test_a_failing_worker_gives_a_crashed_verdict_naming_the_oracle_asked_for(box):
    """pids.max refuses 10**19: the zygote fails, is restarted, fails again; the program's verdict says so."""
    limits = Limits(max_processes=10 ** 19)
    trusted = box.run("", limits, ADD.oracle_program(CORRECT))
    in_process = box.run(ADD.program(CORRECT), limits)
    assert (trusted.status, trusted.oracle, in_process.status, in_process.oracle) == (
        "crashed", "trusted", "crashed", "inprocess"), (trusted, in_process)
    assert "failed twice" in trusted.detail and box.run("", LIMITS, ADD.oracle_program(CORRECT)).passed


@needs_isolation
def test_always_equal_fails_with_a_reason_that_says_so(box):
    trusted = box.run("", LIMITS, ADD.oracle_program(FORGERIES["always_equal_object"]))
    assert "not a valid answer" in trusted.detail and "AlwaysEqual is not plain data" in trusted.detail, trusted


@needs_isolation
@pytest.mark.parametrize("completion,status,detail", [
    (CORRECT, "passed", ""),
    ("    return a - b\n", "failed", "AssertionError"),
    ("    raise ValueError('no')\n", "failed", "ValueError: no"),
    ("    import os\n    os._exit(0)\n", "failed", "ended during a call to add"),
    ("    import ctypes\n    ctypes.string_at(0)\n", "failed", "killed by SIGSEGV"),
    ("    while True: pass\n", "timed_out", "time limit"),
    ("    return (x for x in [a + b])\n", "failed", "AssertionError"),  # an iterator is not 3, as in plain Python
    ("    return 'x' * (1 << 25)\n", "failed", "not a valid answer"),
    ("    return add\n", "failed", "a function is not plain data"),
    ("import sys\nsys.exit(0)\n", "failed", "SystemExit"),
    ("    return a +\n", "failed", "SyntaxError"),
])
def test_candidate_failures_are_failed_calls_with_a_reason(box, completion, status, detail):
    verdict = box.run("", Limits(timeout_s=1), ADD.oracle_program(completion))
    assert verdict.status == status and detail in verdict.detail, verdict


@needs_isolation
def test_judge_is_out_of_the_candidates_reach(box):
    """Another uid: the candidate cannot see, signal or read the judge; its kill attempts fail the sample only."""
    completion = textwrap.dedent("""\
            return a + b
        import os, signal
        mine = os.getuid()
        others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]
        print('visible', others)
        for pid in set(range(2, 200)) - {os.getpid()}:
            try:
                os.kill(pid, signal.SIGKILL)
                print('killed', pid)
            except OSError:
                pass
    """)
    verdict = box.run("", LIMITS, ADD.oracle_program(completion))
    assert verdict.passed, verdict
    assert "visible []" in verdict.stdout and "killed" not in verdict.stdout, verdict.stdout


def _judged(box: Sandbox, candidate: str, tests: str):
    """Run tests that print ``judge <its pid>`` first, 1 s CPU; (verdict, the judge's pid)."""
    verdict = box.run("", Limits(timeout_s=1), OracleProgram(candidate, "", "import os\nprint('judge', os.getpid(), flush=True)\n" + tests,
                                                ("f",)))
    pids = [line.split()[1] for line in verdict.stdout.splitlines() if line.startswith("judge ")]
    return verdict, pids[0] if pids else None


@needs_isolation
def test_one_long_lived_judge_until_a_program_ends_without_its_report(box):
    """The judge (mtp.sandbox.judge) serves program after program, each in a fresh namespace with its
    streams and recursion limit put back; a timeout, a judge that dies, or a call that changed the test's
    objects in place gets the next program a fresh judge, and every verdict stays right."""
    right = "def f(x):\n    return x + 1\n"
    first, judge = _judged(box, right, "import sys\nleft = 1\nsys.setrecursionlimit(60)\nsys.stdout = None\n"
                                       "assert f(1) == 2")
    assert first.passed and judge, first
    again, same = _judged(box, right, "import sys\nassert 'left' not in globals() and sys.getrecursionlimit() > 60\n"
                                      "print('kept')\nassert f(2) == 3")
    assert again.passed and same == judge and "kept" in again.stdout, again
    assert _judged(box, "def f(x):\n    return x\n", "assert f(1) == 2")[0].status == "failed"
    hung, hung_judge = _judged(box, "def f(x):\n    while True: pass\n", "assert f(1) == 2")
    assert hung.status == "timed_out" and hung_judge == judge, hung
    after_timeout, judge = _judged(box, right, "assert f(1) == 2")
    assert after_timeout.passed and judge != hung_judge, after_timeout
    spinning, _ = _judged(box, right, "while True: pass")  # the judge's CPU counts toward the program's
    assert spinning.status == "timed_out" and "cpu time limit" in spinning.detail, spinning
    killed, _ = _judged(box, right, "import signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert killed.status == "crashed" and "SIGKILL" in killed.detail, killed
    after_kill, judge_after_kill = _judged(box, right, "assert f(1) == 2")
    assert after_kill.passed and judge_after_kill != judge, after_kill
    sorted_in_place, sorting_judge = _judged(box, "def f(xs):\n    xs.sort()\n",
                                             "import json\njson.shared = [3, 1, 2]\nf(json.shared)\n"
                                             "assert json.shared == [1, 2, 3]")
    assert sorted_in_place.passed, sorted_in_place
    fresh, fresh_judge = _judged(box, right, "import json\nassert not hasattr(json, 'shared')\nassert f(1) == 2")
    assert fresh.passed and fresh_judge != sorting_judge, fresh
    for _ in range(5):  # the next program never reaches a judge on its way out (200 MB take a while to unmap)
        sort = box.run("", LIMITS, OracleProgram("def f(xs):\n    xs.sort()\n", "", "held = b'x' * (200 << 20)\n"
                                                 "a = [2, 1]\nf(a)\nassert a == [1, 2]\ndef keep(): return held", ("f",)))
        after_sort = box.run("", LIMITS, OracleProgram(right, "", "assert f(1) == 2", ("f",)))
        assert sort.passed and after_sort.passed, (sort, after_sort)


@needs_isolation
def test_exceptions_cross_as_builtin_types_and_output_is_kept(box):
    problem = humaneval_problem({
        "task_id": "T/raise", "prompt": "def root(x):\n", "entry_point": "root",
        "test": "def check(f):\n    try:\n        f(-1)\n    except ValueError as e:\n        assert 'negative' in str(e)\n"
                "    else:\n        raise AssertionError('no ValueError')\n    assert f(4.0) == 2.0\n",
    })
    completion = "    print('called', x)\n    if x < 0: raise ValueError('negative')\n    return x ** 0.5\n"
    verdict = box.run("", LIMITS, problem.oracle_program(completion))
    assert verdict.passed, verdict
    assert verdict.stdout == "called -1\ncalled 4.0\n"


# (candidate, tests): honest code whose values are not plain types, and tests that read them as plain
# Python does; each must get plain Python's verdict (some pass, some fail there).
PARITY_CASES = {
    "in_place_sort_read_back": ("def f(xs):\n    xs.sort()\n", "a = [3, 1, 2]\nf(a)\nassert a == [1, 2, 3], a"),
    "change_then_raise": ("def f(d):\n    d['k'] = 1\n    raise KeyError('k')\n",
                          "d = {}\ntry:\n    f(d)\nexcept KeyError:\n    pass\nassert d == {'k': 1}"),
    "numpy_scalars": ("import numpy as np\ndef f(x):\n    return [np.int64(x), np.float64(x / 2), np.bool_(x > 0)]\n",
                      "assert f(1) == [1, 0.5, True]\nassert isinstance(f(1)[2], bool) is False"),
    "numpy_bool_is": ("import numpy as np\ndef f(x):\n    return np.bool_(x > 0)\n", "assert f(1) is True"),
    "namedtuple": ("import collections\nP = collections.namedtuple('P', 'a b')\ndef f(x):\n    return P(x, -x)\n",
                   "assert f(2) == (2, -2) and isinstance(f(2), tuple)"),
    "counter_vs_dict": ("import collections\ndef f(s):\n    return collections.Counter(s)\n",
                        "assert f('aab') == {'a': 2, 'b': 1}"),
    "ordered_dict_order_ignored": ("import collections\ndef f():\n    return collections.OrderedDict([(2, 'b'), (1, 'a')])\n",
                                   "assert f() == {1: 'a', 2: 'b'}"),
    "fraction_exact": ("from fractions import Fraction\ndef f(x):\n    return Fraction(x, 3)\n",
                       "from fractions import Fraction\nassert f(1) == Fraction(1, 3)\nassert f(1) != 1 / 3"),
    "decimal_exact": ("from decimal import Decimal\ndef f():\n    return Decimal('1.10')\n",
                      "from decimal import Decimal\nassert str(f()) == '1.10' and f() == Decimal('1.1')"),
    "iterator_wrapped": ("def f(n):\n    return (i * i for i in range(n))\n", "assert tuple(f(3)) == (0, 1, 4)"),
    "iterator_compared": ("def f(n):\n    return iter(range(n))\n", "assert f(2) == [0, 1]"),
    "int_enum": ("import enum\nclass C(enum.IntEnum):\n    A = 3\ndef f():\n    return C.A\n", "assert f() == 3"),
    "str_subclass": ("class S(str):\n    pass\ndef f():\n    return S('ab')\n", "assert f() == 'ab' and f().upper() == 'AB'"),
    "float_vs_int": ("def f():\n    return 2.0\n", "assert f() == 2 and type(f()) is int"),
}


@needs_isolation
@pytest.mark.parametrize("name", PARITY_CASES)
def test_trusted_oracle_gives_plain_pythons_verdict(box, name):
    candidate, tests = PARITY_CASES[name]
    plain = subprocess.run([sys.executable, "-I", "-c", candidate + "\n" + tests], capture_output=True, timeout=60)
    verdict = box.run("", LIMITS, OracleProgram(candidate, "", tests, ("f",)))
    assert verdict.oracle == "trusted" and verdict.passed == (plain.returncode == 0), (verdict, plain.stderr[-500:])


@needs_isolation
def test_humaneval_variants_get_plain_pythons_verdict_sampled():
    """A sample of ``oracle_parity``'s run (the full one: ``jobs/bench_eval.py --parity``): canonical
    solutions and their systematic variants, trusted oracle against plain Python."""
    bench = humaneval()
    sample = Benchmark("humaneval-sample", bench.problems[7::41])
    report = oracle_parity.compare(sample, RunnerConfig(backend="local", workers=2))
    assert report.disagreements == [] and report.forged == 0, report.disagreements
    assert report.by_variant["canonical"]["oracle_passed"] == len(sample.problems)
    assert report.by_variant["off_by_one"]["oracle_passed"] == 0


def test_codec_round_trips_plain_data_exactly():
    values = [None, True, 0, -(2 ** 200), 0.1, -0.0, math.inf, 1e-310, complex(1.5, -2), "é\udcff", b"\x00\xff",
              [1, (2, 3)], {"a": {1: frozenset({(1, 2)})}}, set(), ((),), Fraction(-7, 3), Decimal("-1.10E+5"),
              Decimal("NaN")]
    for value in values:
        back = codec.decode(codec.encode(value))
        assert (back == value or value != value) and type(back) is type(value) and repr(back) == repr(value)
    nan = codec.decode(codec.encode(float("nan")))
    assert math.isnan(nan)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value,message", [
    (type("Int", (int,), {})(3), "Int is not plain data"),
    (object(), "object is not plain data"),
    (iter([1]), "list_iterator is not plain data"),
    (_nested(70), "nested deeper"),
    ("x" * (codec.MAX_BYTES + 1), "bytes encoded"),
])
def test_codec_refuses_what_is_not_plain_data(value, message):
    with pytest.raises(codec.CodecError, match=message):
        codec.encode(value)


@pytest.mark.parametrize("raw", [
    b'["x", 1]', b'{"a": 1}', b"1", b'["f", 1.5]', b'["d", [[["l", []], 1]]]', b'["s", [["l", []]]]',
    b"[" * 100000 + b"]" * 100000, b'["i", "0xzz"]', b"\xff", b'["t", [1]]', b'["f","0x1p+99999"]',
    b'["c", "0x1p+99999", "0x0p+0"]', b'["f", "nan(1)"]', b'["b", "0"]', b'["d", [[["s", []], 1]]]', b'"\\ud800"x',
])
def test_codec_decoding_never_builds_anything_but_plain_data(raw):
    with pytest.raises(codec.CodecError):
        codec.decode(raw)


@needs_isolation
@pytest.mark.parametrize("code,tests,wrong", [
    ("def max(a, b):\n    return a if a > b else b", ["assert max(1, 2) == 2", "assert max(5, 3) == 5"],
     "def max(a, b):\n    return a"),
    ("def round(x):\n    return int(x + 0.5)", ["assert round(2.5) == 3", "assert round(0.4) == 0"],
     "def round(x):\n    return int(x)"),
    ("def calendar(n):\n    return n * 7", ["assert calendar(2) == 14"], "def calendar(n):\n    return n"),
], ids=["max", "round", "calendar"])
def test_entry_points_named_like_builtins_or_modules_are_the_candidates(box, code, tests, wrong):
    """MBPP names a function max, round or calendar: the tests must call the completion's, not Python's."""
    problem = mbpp_problem({"task_id": "B", "text": "t", "code": code, "test_list": tests})
    assert problem.candidate_names == (code.split("(")[0][4:],) and not problem.in_process_reason, problem
    right = box.run("", LIMITS, problem.oracle_program(code))
    assert right.passed and right.oracle == "trusted", right
    assert box.run("", LIMITS, problem.oracle_program(wrong)).status == "failed"


@needs_isolation
def test_humaneval_canonical_all_pass_and_stubs_all_fail_through_the_default_backend():
    """164/164 and 0/164 in the trusted-oracle mode, on jobs/evaluate.py's default backend and oracle."""
    bench = humaneval()
    samples = [(p.task_id, p.canonical_solution) for p in bench.problems] + [(p.task_id, "    pass\n") for p in bench.problems]
    result = score_samples(bench, samples, ks=[1], runner=RunnerConfig(), progress=False)
    canonical = [s for s in result.samples if s.sample_index == 0]
    stubs = [s for s in result.samples if s.sample_index == 1]
    assert [s.task_id for s in canonical if not s.passed] == []
    assert [s.task_id for s in stubs if s.passed] == []
    assert result.oracle_counts() == {"trusted": 2 * len(bench.problems)}


@needs_isolation
def test_mbpp_canonical_passes_and_unproxyable_tests_fall_back_in_process_reported():
    bench = load_benchmark(str(DATA / "eval_mbpp_oracle.jsonl"))
    samples = [(p.task_id, p.canonical_solution) for p in bench.problems] + [(p.task_id, "def f(): pass") for p in bench.problems]
    result = score_samples(bench, samples, ks=[1], runner=RunnerConfig(backend="local", workers=1), progress=False)
    by_task = {(s.task_id, s.sample_index): s for s in result.samples}
    for problem in bench.problems:
        assert by_task[problem.task_id, 0].passed, by_task[problem.task_id, 0]
        assert not by_task[problem.task_id, 1].passed
    fallback = {s.task_id for s in result.samples if s.oracle == "fallback"}
    assert fallback == {"912", "913", "915"}, fallback  # 912, 913 seen in the tests' code; 915 when a call is made
    assert "Pair is a class" in by_task["912", 0].detail and "as a value" in by_task["913", 0].detail
    assert "ran in-process: the test passes twice an argument that is not plain data (a function" in by_task["915", 0].detail
    assert {s.oracle for s in result.samples if s.task_id not in fallback} == {"trusted"}
