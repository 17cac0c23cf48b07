"""Laptop-scale reproductions of the paper's small-model findings (``docs/REPRODUCTION.md``).

Each experiment is one or two sweep files (``catalog``) whose ``task:`` section names a
task of ``mtp.tasks``; ``finetune`` chains two sweeps (pretrain, then finetune every
checkpoint). The mean ± std tables and figures come from ``mtp.sweep.report``.
"""
