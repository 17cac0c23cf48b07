"""Export trunk + head 0 of an mtp checkpoint as a Hugging Face model directory.

    python jobs/export_model.py runs/qwen-mtp4 --out ~/models/qwen-base-again
    python jobs/export_model.py models:/my-mtp@champion --out exported --dtype bf16

The directory loads with ``AutoModelForCausalLM.from_pretrained`` (LlamaForCausalLM, or
Qwen2ForCausalLM for a model with q/k/v biases) and, for a model with a tokenizer.json,
``AutoTokenizer``. The extra heads stay behind: they are the mtp checkpoint's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.importing.stream import CAST, ConversionError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory or MLflow URI (models:/name@alias, runs:/...)")
    p.add_argument("--out", type=Path, required=True, help="HF directory to write")
    p.add_argument("--dtype", choices=tuple(CAST), help="cast the weights (default: as stored)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--tracking-uri", help="MLflow store an MLflow URI is resolved in")
    args = p.parse_args(argv)
    from mtp.importing.export import export_hf
    from mtp.tracking.registry import resolve_checkpoint

    dtype = CAST.get(args.dtype)
    try:
        out = export_hf(resolve_checkpoint(args.checkpoint, args.tracking_uri), args.out, dtype, args.overwrite)
    except (ConversionError, FileNotFoundError) as exc:
        print(f"export_model: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
