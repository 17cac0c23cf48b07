"""The GPU path in one run: correctness, training and decoding speed.

``jobs/gpu_check.py`` (``make gpu-check``) runs ``main``; its arguments are parsed here,
where the tests reach them without loading the job script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mtp.bench.gpu_check.report import Row, format_table
from mtp.bench.gpu_check.runner import run_check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: the same code in seconds")
    p.add_argument("--stages", type=int, nargs="+", choices=[1, 2, 3, 4],
                   help="run only these stages (1 correctness, 2 training, 3 decoding, 4 acceleration), e.g. to rerun one")
    p.add_argument("--budget-s", type=float, help="wall-clock budget; items that do not fit are skipped (default 450, tiny 300)")
    p.add_argument("--json", type=Path, default=Path("runs/gpu_check.json"), help="where the results go")
    p.add_argument("--threads", type=int,
                   help="intra-op threads (default on --device cpu: 1, since tiny ops gain nothing from more and a "
                        "shared machine stays steady; on CUDA: torch's default, for host-side work such as initialising)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu --tiny for the dry run)")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if args.threads is not None and args.threads <= 0:
        p.error("--threads must be positive")
    return args


def print_row(row: Row) -> None:
    print(f"[{row.stage}] {row.name}: {row.status} {row.summary}" + (f" | {row.target}" if row.target else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    result = run_check(torch.device(args.device), args.tiny, args.budget_s, args.stages, on_row=print_row)
    rows = [Row(**r) for r in result["rows"]]
    env = result["environment"]
    print(f"\n{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
          f"{env['date_utc']} UTC; {result['elapsed_s']:.0f} s of a {result['budget_s']:.0f} s budget"
          f"{' (tiny sizes)' if args.tiny else ''}")
    print(format_table(rows))
    print("\nPASSED" if result["passed"] else "\nFAILED: a correctness check failed or an item raised")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.json}")
    return 0 if result["passed"] else 1
