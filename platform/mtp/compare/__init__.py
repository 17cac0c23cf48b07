"""Decisive comparisons of n_future arms: floors, arms, statistics and computed verdicts.

``floors``: each task's strongest non-learning answers on the models' own test set;
``stats``: mean, std, a seeded bootstrap interval of each arm's difference to its n=1
arm, and the verdict those numbers allow; ``arms``: the controls a sweep can add beside
param-matched n (compute-matched n=1, all heads on the next token).
"""
