"""``mtp`` is a regular package: installable, versioned, and light to import."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SOURCE_ROOT

HEAVY = ("torch", "ray", "mlflow", "datasets")
PROBE = ("import sys, mtp; print(mtp.__version__); print(mtp.__file__); "
         f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")


def _probe(pythonpath: str, cwd) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines() + [""] * (3 - len(done.stdout.splitlines()))


def test_import_from_source_is_light(tmp_path):
    version, path, heavy = _probe(str(SOURCE_ROOT), tmp_path)
    assert path == str(SOURCE_ROOT / "mtp" / "__init__.py")
    assert heavy == "", f"`import mtp` pulled in {heavy}"
    assert version


def test_version_from_an_installed_checkout(tmp_path):
    """Build and install the project (no dependencies) into a folder; import it from there."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(SOURCE_ROOT / "mtp", source / "platform" / "mtp", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if pip.returncode != 0 and "No module named" in pip.stderr:
        pytest.skip(f"cannot build here: {pip.stderr.strip().splitlines()[-1]}")
    assert pip.returncode == 0, pip.stderr
    version, path, heavy = _probe(str(target), tmp_path)
    assert path == str(target / "mtp" / "__init__.py")
    assert version == _declared_version()
    assert heavy == ""


def test_public_api_resolves_lazily():
    import mtp

    assert set(mtp.__all__) <= set(dir(mtp))
    for name in mtp.__all__:
        assert getattr(mtp, name) is not None, name
    assert mtp.build_config is __import__("mtp.config", fromlist=["build_config"]).build_config
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mtp.nope  # noqa: B018


def test_scoring_a_sample_file_imports_no_torch_or_ray(tmp_path):
    """``jobs/evaluate.py --samples``, end to end: a sample file is scored without the generation
    stack (torch, Ray, transformers, datasets), which costs seconds before the first program runs."""
    from mtp.evaluation.benchmarks import humaneval, write_jsonl
    from mtp.sandbox import isolation_problem

    if isolation_problem() is not None:
        pytest.skip(isolation_problem())
    problem = humaneval().problems[0]
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": problem.task_id, "completion": problem.canonical_solution}])
    heavy = ("torch", "ray", "transformers", "datasets", "mlflow")
    probe = ("import runpy, sys\n"
             f"sys.argv = ['evaluate.py', '--samples', {str(samples)!r}, '--ignore-incomplete', '--workers', '1', '--no-mlflow']\n"
             "try:\n"
             f"    runpy.run_path({str(REPO / 'jobs' / 'evaluate.py')!r}, run_name='__main__')\n"
             "except SystemExit as exc:\n"
             "    print('exit', exc.code)\n"
             f"print('heavy', ','.join(m for m in {heavy!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "exit 0" in done.stdout, done.stdout + done.stderr
    assert '"passed": 1' in done.stdout
    assert done.stdout.splitlines()[-1] == "heavy ", done.stdout


def _declared_version() -> str:
    found = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert found, "pyproject.toml declares no version"
    return found.group(1)


def test_readme_preset_table_is_what_jobs_presets_prints():
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "presets.py")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout in (REPO / "README.md").read_text(), "README's preset table is stale: paste `python jobs/presets.py`"
    assert "| 0.6B | 1536 | 21 | 16 | 2048 | 0.60B |" in done.stdout  # the name says its size
