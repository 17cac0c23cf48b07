"""Benchmark training: multi-token schedules against next-token training, and the loop's own cost.

Default: in one run, at one model size, n=1 and the n=4 schedules (naive, sequential,
sequential-chunked) on the same random batches; tokens/s, peak memory, FLOP ratio
(``mtp.bench.schedules`` says how each is measured).

``--loop``: ``mtp.train`` against a bare loop doing the same work on the same batches
(``bare``), and with ``--via-ray`` the same loop on Ray Train once warm
(``mtp.bench.loop`` says how each is timed; CPU only).

    python jobs/bench_training.py                         # CPU-sized, a few minutes
    python jobs/bench_training.py --device cuda           # 0.3B, bf16 autocast
    python jobs/bench_training.py --loop --via-ray        # configs/tiny.yaml, 1 thread, a few minutes
    python jobs/bench_training.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

# Runnable from a bare checkout (e.g. a GPU box without the package installed).
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

import torch  # noqa: E402

from mtp.bench.schedules import CPU_SPEC, CUDA_SPEC, compare, format_table  # noqa: E402
from mtp.config import MODEL_PRESETS, ConfigError, build_config  # noqa: E402
from mtp.device import intra_op_threads  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--vocab", type=int, nargs="+", default=[260, 32000], help="vocabulary sizes, one table each")
    p.add_argument("--preset", choices=list(MODEL_PRESETS), help="model size (default per device)")
    p.add_argument("--rounds", type=int, help="timing rounds (default per device; --loop: 3)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--chunk-size", type=int, help="positions per cross-entropy chunk")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: steady on a shared machine)")
    p.add_argument("--loop", action="store_true", help="the loop's own cost: mtp.train vs a bare loop")
    p.add_argument("--via-ray", action="store_true", help="with --loop: add mtp.train on Ray Train (a local Ray)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml", help="with --loop: the job config")
    p.add_argument("--steps", type=int, default=30, help="with --loop: timed steps per run")
    p.add_argument("--json", type=Path, help="write the results here as a JSON list")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    for name in ("rounds", "batch_size", "seq_len", "chunk_size", "threads", "steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(v < 2 for v in args.vocab):
        p.error("--vocab sizes must be at least 2")
    if args.via_ray and not args.loop:
        p.error("--via-ray needs --loop")
    if args.loop and args.device != "cpu":
        p.error("--loop runs on the CPU (make gpu-check times the loop on CUDA)")
    return args


def schedules(args: argparse.Namespace) -> list[dict]:
    spec = CUDA_SPEC if args.device == "cuda" else CPU_SPEC
    chosen = dict(
        preset=args.preset, rounds=args.rounds, batch_size=args.batch_size, seq_len=args.seq_len, chunk_size=args.chunk_size
    )
    spec = replace(spec, **{k: v for k, v in chosen.items() if v is not None})
    try:
        spec.model_config(args.vocab[0], spec.n_future)
    except ConfigError as exc:
        raise SystemExit(f"bench_training: {exc}") from None
    results = []
    for vocab in args.vocab:
        rows = compare(spec, vocab)
        print(format_table(spec, rows) + "\n", flush=True)
        results += [asdict(r) for r in rows]
    return results


def loop(args: argparse.Namespace) -> list[dict]:
    from mtp.bench.loop import format_loop_table, measure_loops, timed_config
    from mtp.data import prepare_data

    overrides = {"train.device": "cpu"}
    overrides.update({k: v for k, v in {"train.batch_size": args.batch_size, "train.seq_len": args.seq_len,
                                        "train.preset": args.preset}.items() if v is not None})
    try:
        cfg = build_config(args.config, overrides)
        timed_config(cfg, args.steps)
    except ValueError as exc:  # ConfigError included
        raise SystemExit(f"bench_training: {exc}") from None
    if args.via_ray:
        from mtp.cluster.ray_env import connect

        connect("local", num_cpus=args.threads, log_to_driver=False)  # the rows print their own lines
    data = prepare_data(cfg.data, cfg.train.seq_len)
    results = measure_loops(cfg, data, args.steps, args.rounds or 3, args.via_ray)
    print(format_loop_table(cfg, args.steps, results) + "\n", flush=True)
    return [asdict(r) for r in results]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with intra_op_threads(args.threads if args.device == "cpu" else torch.get_num_threads()):
        results = loop(args) if args.loop else schedules(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
