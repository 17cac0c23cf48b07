"""Benchmark bring-your-own-model: heads trained on an imported model, and conversion cost.

Default (``mtp.bench.byom``): train an n=1 model with the platform on the built-in corpus,
export it to Hugging Face format, import it back with --n-future heads (copies of the last
layer), train the new heads only; then decode held-out prompts at batch 1, greedy: tokens per
forward and tokens/s of the base model (plain), the import (untrained heads) and the trained
model (self-speculative and plain, side by side), and whether each greedy output equals the
base model's.

``--convert``: a random Llama of the given shape (default ~1.2B, Llama-3.2-1B's shape) saved
with ``save_pretrained`` in bf16, then ``jobs/import_model.py`` and ``jobs/export_model.py``
on it in fresh processes: wall-clock and peak RSS of each (the exec'd process's VmHWM:
``getrusage``'s maxrss would carry the parent's peak over the fork; RSS counts the
memory-mapped source pages the process touched).

    python jobs/bench_import.py --json byom.json                  # minutes on 2 CPU cores
    python jobs/bench_import.py --convert --json convert.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from mtp.bench.byom import ByomSettings, run_byom, table  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=4096)


def convert(workdir: Path, n_future: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from test_import_model import write_tokenizer

    src = workdir / "llama"
    clock = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(src)
    del model
    write_tokenizer(src)
    made = time.perf_counter() - clock
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    result = {"params": params, "safetensors_bytes": size, "build_and_save_s": made}
    for name, argv in (("import", ["jobs/import_model.py", "--hf", str(src), "--n-future", str(n_future),
                                   "--out", str(workdir / "mtp")]),
                       ("export", ["jobs/export_model.py", str(workdir / "mtp"), "--out", str(workdir / "back")])):
        clock = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = sys.argv[1:]; "
                               "code = 0\ntry: runpy.run_path(sys.argv[0], run_name='__main__')\n"
                               "except SystemExit as e: code = e.code\n"
                               "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
                               "print('PEAK_RSS', int(hwm) * 1024); sys.exit(code)",
                               *argv], cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
        peak = int(re.search(r"PEAK_RSS (\d+)", done.stdout).group(1))
        result[name] = {"seconds": time.perf_counter() - clock, "peak_rss_bytes": peak}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--convert", action="store_true", help="conversion time and memory on a random ~1B Llama")
    p.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary directory)")
    p.add_argument("--json", type=Path)
    for f in fields(ByomSettings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.default is not None else int,
                       default=f.default)
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        if args.convert:
            result = convert(workdir, args.n_future)
            gib = 2**30
            print("| step | seconds | peak RSS (GiB) |\n|---|---|---|")
            for name in ("import", "export"):
                print(f"| {name} | {result[name]['seconds']:.1f} | {result[name]['peak_rss_bytes'] / gib:.2f} |")
            print(f"source: {result['params'] / 1e9:.2f}B parameters, {result['safetensors_bytes'] / gib:.2f} GiB bf16 safetensors")
        else:
            settings = ByomSettings(**{f.name: getattr(args, f.name) for f in fields(ByomSettings)})
            result = run_byom(workdir, settings)
            print(table(result))
            print(f"speedup at batch 1 (trained heads, speculative vs plain): {result['speedup_batch1']:.2f}x; "
                  f"trunk and head 0 bit-identical: {result['trunk_and_head0_bit_identical']}")
            print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()))
    result["load_average"] = load
    print(f"load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2 cores, shared)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
