"""Print every model preset's shape and parameter count, as the README's table (markdown).

    python jobs/presets.py

Counts come from ``mtp.model.count_parameters`` (the config alone, no weights built):
with the default byte vocabulary (260) and with a 32k-token one (LLaMA's, the paper's),
for the next-token model (n_future=1) and for n_future=4 with the trunk kept.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.config import MODEL_PRESETS, model_preset  # noqa: E402
from mtp.model import count_parameters  # noqa: E402


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def main() -> int:
    print("| preset | dim | layers | heads | max_seq_len | params, n=1 | params, n=4 | params, n=1, 32k vocab | params, n=4, 32k vocab |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in MODEL_PRESETS:
        shape = model_preset(name, n_future=1)
        counts = [count_parameters(replace(shape, vocab_size=vocab, n_future=n))["total"]
                  for vocab in (shape.vocab_size, 32000) for n in (1, 4)]
        print(f"| {name} | {shape.dim} | {shape.n_layers} | {shape.n_heads} | {shape.max_seq_len} | "
              + " | ".join(_size(c) for c in counts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
