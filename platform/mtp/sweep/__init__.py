"""Ray Tune sweeps over training configs (n_future x model size), compared in MLflow.

``load_spec`` reads and validates a sweep file; ``run_sweep`` runs it on the connected
Ray cluster and leaves one MLflow parent run with a child run per trial, a summary
table, a metric-vs-n_future plot and a ``best_trial`` tag.
"""

from mtp.sweep.driver import SweepResult, run_sweep
from mtp.sweep.progress import SweepInterrupted, interrupted_count
from mtp.sweep.spec import SweepError, SweepSpec, load_spec

__all__ = ["SweepError", "SweepInterrupted", "SweepResult", "SweepSpec", "interrupted_count", "load_spec",
           "run_sweep"]
