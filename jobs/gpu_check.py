"""The GPU path in one run: correctness, training and decoding speed (``mtp.bench.gpu_check``).

    PYTHONPATH=platform python jobs/gpu_check.py                       # one H200: at most ~8 minutes
    PYTHONPATH=platform python jobs/gpu_check.py --device cpu --tiny   # the dry run CI keeps alive

Needs torch and pytest (the correctness stage runs the test suite's numerics tests on the
device; transformers, if present, adds the Llama comparison): no Ray, MLflow or HF datasets. Prints each row as it is measured, then the table; writes the JSON.
Exits 1 when a correctness check failed or an item raised.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a bare checkout (the GPU machine installs nothing).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.bench.gpu_check.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
