"""Serve a config written by jobs/serve_config.py on a local Ray, in the foreground.

    python jobs/serve.py serve.yaml          # = `serve run serve.yaml`; Ctrl-C or SIGTERM stops it

The same as Ray's `serve run`, except that a SIGTERM stops it quietly: Ray's native
failure-signal handler prints a stack dump for every SIGTERM a driver receives, and
this foreground server is stopped by one (a `kill`, a process manager). The handler is
switched off in this process only (RAY_DISABLE_FAILURE_SIGNAL_HANDLER); Serve's
replicas and the rest of Ray keep theirs. On a cluster use `serve deploy` instead.
"""

import os
import sys

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from ray.serve.scripts import cli

    cli.main(["run", *sys.argv[1:]], prog_name="jobs/serve.py")
