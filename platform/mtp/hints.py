"""Commands the console prints for the user to paste (resume, browse): complete, and working as printed.

A hint names programs the way this process can run them: ``python`` / ``mlflow`` when the
shell's PATH finds the ones beside this interpreter, else their path (``.venv/bin/mlflow``
from the repository root); scripts relative to the working directory when they are under it.
A job that runs under ``ray job submit`` gets the submit command around it, since that is
how it was started (the job's working directory is the uploaded copy of the checkout).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def program(name: str) -> str:
    """``name`` if PATH finds the one beside this interpreter (a venv's bin), else its path."""
    beside = Path(sys.executable).parent / name
    found = shutil.which(name)
    if not beside.exists() or (found is not None and Path(found).parent == beside.parent):
        return name
    return _shown(beside)


def command(script: str | Path, *args: str) -> str:
    """The shell command that runs ``script`` with ``args`` the way this process was run."""
    from mtp.tracking.runs import ray_job_id

    if ray_job_id() is not None:  # the job's cwd is its working dir: the script relative to it
        return shlex.join(["ray", "job", "submit", "--working-dir", ".", "--", "python", _shown(Path(script)), *args])
    return shlex.join([program("python"), _shown(Path(script)), *args])


def mlflow_browse(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """Where to look at a run: the server's page, or the ``mlflow ui`` command for a sqlite store."""
    if uri.startswith(("http://", "https://")):
        page = f"/#/experiments/{experiment_id}" if experiment_id else ""
        return uri.rstrip("/") + page + (f"/runs/{run_id}" if experiment_id and run_id else "")
    return f"{program('mlflow')} ui --backend-store-uri {uri}"


def _shown(path: Path) -> str:
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
