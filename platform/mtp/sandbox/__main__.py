"""``python -m mtp.sandbox run PROGRAM.py [--timeout S] [--memory MB]``: print one verdict as JSON.

Exit status: 0 passed, 1 any other verdict, 2 the sandbox refused or could not start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtp.sandbox import Limits, Sandbox, SandboxConfig, SandboxUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtp.sandbox", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one program to a verdict")
    run.add_argument("program", type=Path)
    defaults = Limits()
    run.add_argument("--timeout", type=float, default=defaults.timeout_s, help="CPU seconds of the whole tree; wall time gets 3x (default %(default)s)")
    run.add_argument("--memory", type=int, default=defaults.memory_mb, help="MB for the whole tree (default %(default)s)")
    run.add_argument("--max-processes", type=int, default=defaults.max_processes)
    run.add_argument("--output-bytes", type=int, default=defaults.output_bytes)
    run.add_argument("--insecure", action="store_true", help="run without isolation where it is unavailable (loud warning)")
    args = parser.parse_args(argv)
    try:
        source = args.program.read_text()
    except OSError as exc:
        parser.error(f"cannot read {args.program}: {exc.strerror}")
    try:
        limits = Limits(timeout_s=args.timeout, memory_mb=args.memory, max_processes=args.max_processes,
                        output_bytes=args.output_bytes).validate()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with Sandbox(SandboxConfig(insecure=args.insecure)) as box:
            verdict = box.run(source, limits)
    except SandboxUnavailable as exc:
        print(f"mtp.sandbox: {exc}", file=sys.stderr)
        return 2
    print(verdict.to_json())
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
