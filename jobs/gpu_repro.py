"""The induction experiment (paper §4.1) at the paper's 1M size, n=1 vs n=2, on one GPU (``mtp.bench.gpu_repro``).

    PYTHONPATH=platform python jobs/gpu_repro.py                       # one H100: at most ~8 minutes
    PYTHONPATH=platform python jobs/gpu_repro.py --device cpu --tiny   # the dry run CI keeps alive

Needs only torch and numpy: no Ray, MLflow or HF datasets. Prints the table (final and
best-checkpoint scores, formation per seed, floors, the verdict of n=2 against n=1) and
writes the JSON with every trial's scores over training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Runnable from a bare checkout (the GPU machine installs nothing).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402

from mtp.bench.gpu_repro import config_for, format_table, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: the same code in a minute")
    p.add_argument("--seeds", type=int, help="seeds per arm (default 4, tiny 2)")
    p.add_argument("--steps", type=int, help="training steps per trial (default 8000: ~100x the CPU sweep's tokens)")
    p.add_argument("--budget-s", type=float, help="training deadline of every trial, from the start (default 400)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other setting of mtp.bench.gpu_repro.ReproConfig, e.g. --set dim=64 --set workers=8")
    p.add_argument("--json", type=Path, default=Path("runs/gpu_repro.json"), help="where the results go")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu --tiny for the dry run)")
    for name in ("seeds", "steps", "budget_s"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        cfg = config_for(args.tiny, args.device, args.set, seeds=args.seeds, steps=args.steps, budget_s=args.budget_s)
    except ValueError as exc:
        p.error(str(exc))
    result = run(cfg)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device}, torch {torch.__version__}: {len(result['trials'])} trials in {result['elapsed_s']:.0f} s"
          f"{' (tiny sizes)' if args.tiny else ''}")
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**result, "device": device}, indent=2, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
