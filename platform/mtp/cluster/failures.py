"""Failures as a user reads them: one line per failure with its cause, then what to do next.

Ray reports a failed worker group as an exception holding every rank's exception (with
remote tracebacks), and each worker, the Train controller and Ray's own actors print
their tracebacks too. The console gets ``cause()`` of each: the exception type and the
first line that says what happened (for a dead worker process, Ray's "exit detail").
The full tracebacks stay in the job's log file (``mtp.cluster.logs.route_worker_logs``)
and, with ``--verbose``, on the console.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

MAX_CAUSE = 200
_EXIT_DETAIL = re.compile(r"Worker exit detail: (.+?)(?: There are some potential root causes| Some common causes|$)", re.S)
_SOURCE_PREFIX = re.compile(r"^\[[^\]]+\.(?:cc|cpp|h):\d+\]\s*")  # gloo/NCCL: "[.../pair.cc:537] Read error ..."
_ADVICE = (" This is typically caused by",)


class JobStopped(KeyboardInterrupt):
    """The job was stopped (Ctrl-C, SIGTERM); the message names the last checkpoint to resume from."""


def causes(exc: BaseException) -> list[str]:
    """One line per failure: ``rank N: Type: what happened`` for each failed worker, else the one cause."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None and exc.cause is not exc:
        return causes(exc.cause)
    worker_failures = getattr(exc, "worker_failures", None)
    if worker_failures:
        return [f"rank {rank}: {cause(error)}" for rank, error in sorted(worker_failures.items())]
    controller_failure = getattr(exc, "controller_failure", None)
    if controller_failure is not None:
        return causes(controller_failure)
    return [cause(exc)]


def cause(exc: BaseException) -> str:
    """``Type: what happened``, in one line, for any exception Ray or training raises."""
    from ray.exceptions import ActorDiedError, RayTaskError

    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None and exc.cause is not exc:
        return cause(exc.cause)
    if getattr(exc, "health_check_failure", None) is not None:  # Train's WorkerHealthCheckFailedError
        return f"health check failed: {cause(exc.health_check_failure)}"
    if getattr(exc, "worker_failures", None) or getattr(exc, "controller_failure", None) is not None:
        return "; ".join(causes(exc))
    text = str(exc)
    if isinstance(exc, ActorDiedError):
        detail = _EXIT_DETAIL.search(text)
        return "its process died" + (f" ({' '.join(detail.group(1).split())})" if detail else "")
    first = _SOURCE_PREFIX.sub("", next((line.strip() for line in text.splitlines() if line.strip()), ""))
    for advice in _ADVICE:
        first = first.split(advice)[0]
    first = first if len(first) <= MAX_CAUSE else first[: MAX_CAUSE - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def failure_report(exc: BaseException, checkpoint: Path | str | None, log: Path | None) -> str:
    """What the console says when a job ends early: why (one line per failure), the last
    checkpoint, the command that resumes, and the log file, which gets the full tracebacks."""
    from mtp.hints import command

    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write("\n== the job's error ==\n" + "".join(traceback.format_exception(exc)))
    if isinstance(exc, KeyboardInterrupt):
        from mtp.cluster.lifecycle import stop_reason

        lines = [f"stopped by {stop_reason(exc)}"]
    else:
        found = causes(exc)
        lines = [f"training failed: {found[0]}"] if len(found) == 1 else ["training failed:", *(f"  {c}" for c in found)]
    lines.append(f"last checkpoint: {checkpoint or 'none'}")
    if checkpoint:
        lines.append(f"resume with: {command(sys.argv[0], '--resume', str(checkpoint))}")
    if log is not None:
        lines.append(f"details (tracebacks, every worker's output): {log}")
    return "\n".join(lines)


def failure_reporter(max_failures: int):
    """A Ray Train controller callback: a console line for each worker failure that Ray restarts
    the workers after (``--max-failures``); the last one is the job's own failure report."""
    import ray.train

    class FailureReporter(ray.train.UserCallback):
        failures = 0

        def after_exception(self, run_context, worker_exceptions):
            self.failures += 1
            if self.failures > max_failures:
                return
            for rank, error in sorted(worker_exceptions.items()):
                print(f"worker failure {self.failures} of {max_failures} allowed: rank {rank}: {cause(error)}",
                      flush=True)
            print("restarting the workers from the last checkpoint", flush=True)

    return FailureReporter()
