"""Laptop-scale reproductions of the paper's small-model findings (``docs/REPRODUCTION.md``).

Each experiment is a synthetic task: a deterministic generator whose train,
validation and test problems are disjoint by construction (``splits``), a corpus
file that ``data.source`` trains on, and a task metric computed by the platform's
own decoding engine on held-out problems (``scoring``). Sweep files name a task in
their ``task:`` section (``tasks.TaskSpec``); ``report`` turns the trials into the
mean ± std table and figure of the sweep's MLflow parent run.
"""
