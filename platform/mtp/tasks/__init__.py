"""Synthetic tasks of the paper's small-model findings, and the speed measurement: what a sweep trains on and is scored with.

Each task is a deterministic generator whose train, validation and test problems are
disjoint by construction (``splits``); ``spec.TaskSpec`` writes its training corpus
(which ``data.source`` trains on) and scores a checkpoint with the platform's own
decoding engine on held-out problems (``scoring``). ``speed.SpeedSpec`` measures
self-speculative decoding instead. Nothing here imports the sweep: the sweep's
``task:`` section builds these (``mtp.sweep.scorers``).
"""
