"""Where a job's outputs may go: nowhere that disappears with the job.

Under ``ray job submit --working-dir .`` a job runs in Ray's copy of the working
directory, a temporary folder that Ray garbage-collects and that nobody looks into
after the job: a relative output path (``runs/``, ``runs/sweeps``) would put
checkpoints and sweep state there. So a job refuses one, before any work.
"""

from __future__ import annotations

from pathlib import Path

from mtp.tracking.runs import ray_job_id


class OutputError(ValueError):
    """An output location that would not outlive the job."""


def check_durable(path: str | None, option: str) -> None:
    """Raise OutputError when this process is a Ray job's entrypoint and ``path`` is relative."""
    if ray_job_id() is None or (path and ("://" in path or Path(path).expanduser().is_absolute())):
        return
    what = f"{option}={path!r} is relative" if path else f"{option} is not given (its default is relative)"
    raise OutputError(
        f"{what}: under `ray job submit` it would land in the job's temporary working "
        f"directory ({Path.cwd()}), which Ray deletes; give an absolute path on storage the cluster keeps "
        f"(e.g. {option}=/mnt/shared/mtp) or an s3:// URI"
    )
