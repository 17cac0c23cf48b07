"""Put multi-token heads on a pretrained model: import a Hugging Face or Meta checkpoint.

    python jobs/import_model.py --hf ~/models/Qwen2.5-0.5B --n-future 4 --out runs/qwen-mtp4
    python jobs/import_model.py --meta ~/models/7B_200B_4 --out runs/meta-7b-4 --register meta-7b-4
    python jobs/import_model.py --hf DIR --n-future 4 --new-heads random --dtype fp32 --register my-mtp

The result is an ordinary mtp checkpoint: train its heads with
``jobs/train.py --init-from OUT --n-future 4 --set train.freeze=[trunk,head0]``, evaluate
and serve it with ``jobs/evaluate.py --model`` / ``jobs/serve_config.py --model``, and
export trunk + head 0 back with ``jobs/export_model.py``. With ``--register NAME`` it
is logged to MLflow (experiment ``mtp-import``) and registered as a new version of NAME.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from mtp.importing.stream import CAST, ConversionError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=Path, help="a save_pretrained directory (LlamaForCausalLM, Qwen2ForCausalLM)")
    source.add_argument("--meta", type=Path, help="Meta's params.json + consolidated.*.pth (+ tokenizer.json) directory")
    p.add_argument("--n-future", type=int, help="heads of the result (--hf default 4; --meta default: the checkpoint's)")
    p.add_argument("--out", type=Path, help="checkpoint directory to write (default runs/imported/<source name>-n<N>)")
    p.add_argument("--new-heads", choices=("copy", "random"), default="copy",
                   help="heads the source lacks start as copies of head 0 (default) or freshly initialised")
    p.add_argument("--max-seq-len", type=int, help="context the decoder allocates for (default: the model's, at most 4096)")
    p.add_argument("--dtype", choices=tuple(CAST), help="cast the weights (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--register", metavar="NAME", help="log to MLflow and register as a new version of NAME")
    p.add_argument("--tracking-uri", help="MLflow store for --register (default: MLFLOW_TRACKING_URI or the local store)")
    args = p.parse_args(argv)
    if args.n_future is not None and args.n_future < 1:
        p.error("--n-future must be >= 1")
    return args


def register(checkpoint: Path, name: str, uri: str | None) -> str | None:
    """One MLflow run in ``mtp-import`` holding the checkpoint as its model, registered as ``name``."""
    from mtp.checkpoint import read_config
    from mtp.config import from_dict
    from mtp.tracking.runs import register_checkpoint, start_run
    from mtp.tracking.store import client, tracking_uri

    cfg = from_dict(read_config(checkpoint))
    cfg.tracking.experiment, cfg.tracking.run_name = "mtp-import", f"import-{checkpoint.name}"
    cfg.tracking.registered_model, cfg.tracking.tracking_uri = name, uri
    provenance = json.loads((checkpoint / "import.json").read_text())
    run_id = start_run(cfg, tags={f"import.{k}": str(v) for k, v in provenance.items()})
    model_uri = register_checkpoint(cfg, run_id, checkpoint)
    client(tracking_uri(cfg.tracking)).set_terminated(run_id)
    return model_uri


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = CAST.get(args.dtype)
    source = args.hf or args.meta
    start = time.perf_counter()
    try:
        if args.hf:
            from mtp.importing.hf import import_hf

            n_future = args.n_future or 4
            out = args.out or REPO / "runs" / "imported" / f"{source.name}-n{n_future}"
            import_hf(source, out, n_future, args.new_heads, args.max_seq_len, dtype, overwrite=args.overwrite)
        else:
            from mtp.importing.meta import import_meta

            out = args.out or REPO / "runs" / "imported" / f"{source.name}-n{args.n_future or 'src'}"
            import_meta(source, out, args.n_future, new_heads=args.new_heads, max_seq_len=args.max_seq_len or 4096,
                        dtype=dtype, overwrite=args.overwrite)
    except (ConversionError, FileNotFoundError) as exc:
        print(f"import_model: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {out} in {seconds:.1f} s (peak RSS {peak:.2f} GiB)")
    if args.register:
        print(f"registered {register(Path(out), args.register, args.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
