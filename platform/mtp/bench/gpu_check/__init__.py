"""``make gpu-check``: one prepared run that says whether the GPU path is correct and fast.

Four stages, in order, under one wall-clock budget (``runner.run_check``):

1. ``correctness``: the test suite's numerics tests on the device (``pytest -m device
   --device cuda``), then bf16 divergence (speculative vs vanilla, CUDA graphs vs eager) reported;
2. ``training``: tokens/s, MFU against a measured matmul peak, peak memory and time
   vs FLOP ratios of the users' training loop at 0.3B and 1.3B, n=1 vs n=4;
3. ``decoding``: decode-step times at 0.3B, eager and CUDA graphs, and ``transformers``'
   Llama with the same weights beside ours;
4. ``acceleration``: a byte-level n=4 model trained for minutes on the built-in corpus,
   decoded self-speculatively on HumanEval prompts.

A correctness failure stops the run. The core imports no Ray, MLflow or HF
``datasets``: the GPU machine has none of them.
"""
